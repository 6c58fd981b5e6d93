"""Planning a job before it runs: cluster profiles, per-GPU memory, rank layout, and the
layout planner (every layout that validates and fits, ranked by estimated step time).

Pure Python over the typed config (no torch for `cluster`, `memory` and `planner`), so a login
node or a laptop can price the 671B model. `layout` asks megatron-core's own `RankGenerator`.
"""
