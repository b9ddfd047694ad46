"""Offline hard-negative mining: the candidate pool and the miner."""

from embtune.mining.miner import HardNegativeMiner

__all__ = ["HardNegativeMiner"]
