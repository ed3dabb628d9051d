"""DRAEM (Zavrtanik et al., ICCV 2021): a discriminatively trained reconstruction embedding, registered as `draem`."""

from baselines.draem.detector import DRAEM, DRAEMConfig, DRAEMMeta

__all__ = ["DRAEM", "DRAEMConfig", "DRAEMMeta"]
