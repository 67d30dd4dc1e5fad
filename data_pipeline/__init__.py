"""Tokenisation to webdataset shards (one process or a SLURM job array), streaming loading,
weighted mixtures and resumable state."""
