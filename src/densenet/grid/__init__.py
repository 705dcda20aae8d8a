"""Reproducing the paper's tables: named grids of ordinary training runs (reproduce.py), the launchers
that run their cells here, on SLURM or on Ray (launchers.py), and each cell's state read back from its
run directory (status.py). `densenet reproduce` is the command line of this package."""
