"""UniAD-style reconstruction baseline; `model.ReconstructionTransformer` is shared with LTAD."""
