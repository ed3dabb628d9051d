"""UniAD-style reconstruction baseline; its transformer lives in `ltbench.reconstruction` (shared with LTAD)."""

from baselines.uniad.detector import UniAD, UniADAlign, UniADAlignConfig, UniADConfig

__all__ = ["UniAD", "UniADAlign", "UniADAlignConfig", "UniADConfig"]
