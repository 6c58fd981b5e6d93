"""Models built from megatron-core ModuleSpecs through our backend spec providers."""
