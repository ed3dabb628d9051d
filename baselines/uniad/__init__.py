"""UniAD-style reconstruction baseline; `model.ReconstructionTransformer` is shared with LTAD."""

from baselines.uniad.detector import UniAD, UniADConfig

__all__ = ["UniAD", "UniADConfig"]
