"""RegAD (Huang et al., ECCV 2022) in the LTAD paper's all-classes protocol; see README.md."""

from baselines.regad.detector import RegAD, RegADConfig

__all__ = ["RegAD", "RegADConfig"]
