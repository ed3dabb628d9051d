"""Cut & Paste (Li et al., CVPR 2021): self-supervised CutPaste classification + Gaussian density. Detection only."""

from baselines.cutpaste.detector import CutPaste, CutPasteConfig

__all__ = ["CutPaste", "CutPasteConfig"]
