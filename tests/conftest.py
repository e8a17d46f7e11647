"""Test-wide settings. Set before torch starts its OpenMP pool: on a small, shared machine (2 cores, other
processes busy) spinning OpenMP workers starve each other and the suite slows by 10x or more; sleeping
workers cost a little latency per parallel region and nothing else."""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
