"""LTAD, the reference model of LTBench (Ho, Peng, Vasconcelos, CVPR 2024); spec in ltad_model/README.md."""

from ltad_model.detector import LTAD, LTADConfig, LTADWithoutSAD, LTADWithoutSADConfig

__all__ = ["LTAD", "LTADConfig", "LTADWithoutSAD", "LTADWithoutSADConfig"]
