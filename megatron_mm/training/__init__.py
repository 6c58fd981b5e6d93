"""Training: the loop (`loop.py`), checkpoints, metrics and FLOPs accounting."""
