"""Built-in synthetic dataset `synth`: a deterministic generator of an MVTec-layout AD dataset.

Twelve classes, six textures and six objects, each drawn with natural variation (pose, phase,
lighting gradient, colour cast, sensor noise), and six kinds of local defect (scratch, hole,
stain, crack, missing part, extra part) with exact pixel masks. Every class has `N_MAX` = 200
normal training images, so every long-tailed split of the recipe is available, and a test set of
20 normal and 24 anomalous images. The data path is the one of every dataset:
`ensure_generated()` writes the root once (atomically), `read_catalog(root)` reads it.

Each image comes from its own seeded generator, keyed by (seed, class, split, defect, index):
the same generator version writes the same pixels, whatever the number of workers or the subset
of classes generated.

The package, in data-flow order: `classes` (what the dataset holds), `draw` (vectorised drawing
primitives), `render` (one scene per class, the defect painters, `render_sample`), `spec` (what
a generated root holds, where the built-in one lives), `writer` (`generate`, `ensure_generated`),
`catalog` (`read_catalog`). Importing the package is cheap: numpy, scipy and Pillow are loaded
only when an image is rendered or written.
"""

from __future__ import annotations

import importlib
from typing import Any

from ltbench.datasets.synth.catalog import read_catalog
from ltbench.datasets.synth.classes import (
    CLASS_ORDER,
    DEFECT_KINDS,
    DEFECTS,
    IMAGE_SIZE,
    INFO,
    LAYOUT,
    N_MAX,
    N_TEST_GOOD,
    N_TEST_PER_DEFECT,
    TEXTURES,
)
from ltbench.datasets.synth.spec import (
    DEFAULT_SPEC,
    GENERATOR_VERSION,
    STAMP_NAME,
    SynthSpec,
    default_home,
    is_generated,
    sample_keys,
)

__all__ = [
    "CLASS_ORDER", "DEFAULT_SPEC", "DEFECTS", "DEFECT_KINDS", "GENERATOR_VERSION", "IMAGE_SIZE", "INFO", "LAYOUT",
    "N_MAX", "N_TEST_GOOD", "N_TEST_PER_DEFECT", "STAMP_NAME", "TEXTURES", "SynthSpec", "default_home",
    "ensure_generated", "generate", "is_generated", "read_catalog", "render_sample", "sample_keys",
]

# Loaded on first use (PEP 562): they need numpy, scipy and Pillow.
_LAZY = {"render_sample": "render", "generate": "writer", "ensure_generated": "writer"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
