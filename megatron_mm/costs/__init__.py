"""Cost models from the config alone (no torch, no process group): training FLOPs (`flops`),
the FLOPs-balanced layers per pipeline stage (`pipeline_split`) and per-GPU memory
(`memory`). Imports only `megatron_mm.config`; models, training and planning use them."""
