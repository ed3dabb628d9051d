"""PatchCore (Roth et al., CVPR 2022): coreset memory bank of patch features, nearest-neighbour scores."""

from baselines.patchcore.detector import PatchCore, PatchCoreConfig

__all__ = ["PatchCore", "PatchCoreConfig"]
