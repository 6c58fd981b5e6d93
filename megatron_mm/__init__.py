"""megatron_mm: multimodal 3D-parallel pretraining (MoE + MLA) on megatron-core."""

__version__ = "0.1.0"
