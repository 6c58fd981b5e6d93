"""Planning a job before it runs: cluster profiles, per-GPU memory, rank layout.

Pure Python over the typed config (no torch for `cluster` and `memory`), so a login node or
a laptop can price the 671B model. `layout` asks megatron-core's own `RankGenerator`.
"""
