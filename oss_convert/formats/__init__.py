"""One module per on-disk format: reading and writing it, nothing else."""
