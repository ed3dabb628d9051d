"""MKD (Salehi et al., CVPR 2021): multiresolution knowledge distillation from a frozen teacher to a "cloner"."""

from baselines.mkd.detector import MKD, MKDConfig

__all__ = ["MKD", "MKDConfig"]
