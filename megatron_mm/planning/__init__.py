"""Planning a job before it runs: cluster profiles, rank layout, whether the model state fits a
GPU (`fit`), and the layout planner (every layout that validates and fits, ranked by estimated
step time). The estimates themselves are `megatron_mm.costs`'.

Pure Python over the typed config (no torch for `cluster`, `fit` and `planner`), so a login
node or a laptop can price the 671B model. `layout` asks megatron-core's own `RankGenerator`.
"""
