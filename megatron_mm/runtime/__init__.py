"""Process/device runtime: distributed init (torchrun or SLURM) and the CPU/no-TE compat layer."""
