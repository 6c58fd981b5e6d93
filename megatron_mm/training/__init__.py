"""Training: the loop (`loop.py`), step data, checkpoints, metrics (FLOPs from `costs.flops`) and evaluation."""
