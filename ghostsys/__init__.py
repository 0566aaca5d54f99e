"""ghostsys: Ghost Batch Normalization as a distributed-training systems phenomenon."""

__version__ = "0.1.0"
