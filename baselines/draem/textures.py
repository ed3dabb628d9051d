"""Anomaly-source textures for DRAEM: a folder of images (DTD, as the official code) or LTBench's own.

- `FolderTextures`: the official source is the Describable Textures Dataset (dtd-r1.0.1), read as
  `anomaly_source_path/*/*.jpg` (data_loader.py L78, all 47 categories) and drawn uniformly; any
  folder laid out that way works, else every .jpg/.jpeg/.png below it is used.
- `GeneratedTextures` (the offline default): a fixed bank of procedural textures rendered by
  LTBench from a seeded generator, lazily, and kept in memory up to `GeneratedTextures.MEMORY_LIMIT`
  (256 MB; a texture takes a few ms, and one drawn again past the limit is rendered again, identically).
  Four families, each coloured by a random 2-4 colour palette and overlaid with mild pixel noise:
  fractal Perlin noise (cloudy, marbled surfaces), oriented gratings (sine or square waves:
  fabric, scratches, stripes), quantised Perlin blobs (spots, stains, patches) and blurred grain
  (sand, concrete). They are not DTD: they lack DTD's photographic textures (cracks, woven
  objects, honeycombs, ...), so results with them differ from results with DTD.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from baselines.draem.augment import TextureSource, rand_perlin_2d
from ltbench.errors import ConfigError, DatasetError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


class FolderTextures(TextureSource):
    """The images under `root` (DTD: `root/<category>/*.jpg`), resized to size × size, in BGR order when `bgr`."""

    def __init__(self, root: Path | str, size: int, bgr: bool = True):
        self.root, self.size, self.bgr = Path(root).expanduser(), size, bgr
        if not self.root.is_dir():
            raise ConfigError(f"anomaly_source {self.root} is not a folder; give the DTD images folder "
                              "(dtd/images, with one sub-folder per category) or 'generated'")
        files = sorted(self.root.glob("*/*.jpg"))  # the official glob
        if not files:
            files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ConfigError(f"anomaly_source {self.root} holds no .jpg/.jpeg/.png images; give the DTD images "
                              "folder (dtd/images) or 'generated'")
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def texture(self, index: int) -> np.ndarray:
        """Texture `index` as uint8 (size, size, 3)."""
        path = self.files[index]
        try:
            with Image.open(path) as image:
                resized = image.convert("RGB").resize((self.size, self.size), Image.Resampling.BILINEAR)
        except OSError as exc:
            raise DatasetError(f"cannot read the anomaly-source texture {path} ({exc}); remove or replace it") from None
        array = np.asarray(resized)
        return np.ascontiguousarray(array[..., ::-1]) if self.bgr else array


class GeneratedTextures(TextureSource):
    """`count` procedural textures of size × size; texture i comes from its own generator seeded (seed, i)."""

    MEMORY_LIMIT = 256 * 2**20  # bytes of rendered textures kept; the rest are rendered again (identically) when drawn

    def __init__(self, count: int, size: int, seed: int):
        self.count, self.size, self.seed = count, size, seed
        self._bank: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.count

    def texture(self, index: int) -> np.ndarray:
        """Texture `index` as uint8 (size, size, 3), rendered on first use and kept while the bank is under `MEMORY_LIMIT`."""
        if index in self._bank:
            return self._bank[index]
        texture = generate_texture(self.size, np.random.default_rng([self.seed, index]))
        if (len(self._bank) + 1) * texture.nbytes <= self.MEMORY_LIMIT:  # 5,640 at 256 px would be 1.1 GB
            self._bank[index] = texture
        return texture


def fractal_perlin(size: int, rng: np.random.Generator, base: int, octaves: int) -> np.ndarray:
    """Σ_o 0.5^o · Perlin(scale base·2^o), scales capped at 32 (size must be a multiple of 32); (size, size) in [0, 1]."""
    total = np.zeros((size, size))
    for octave in range(octaves):
        scale = min(base * 2**octave, 32)
        total += 0.5**octave * rand_perlin_2d((size, size), (scale, scale), rng)
    return normalise(total)


def normalise(values: np.ndarray) -> np.ndarray:
    """Min-max to [0, 1] (a constant array gives 0.5)."""
    low, high = values.min(), values.max()
    return np.full_like(values, 0.5) if high - low < 1e-12 else (values - low) / (high - low)


def colour_map(values: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """(H, W) values in [0, 1] → (H, W, 3) colours interpolated along the palette (K, 3)."""
    stops = np.linspace(0.0, 1.0, len(palette))
    return np.stack([np.interp(values, stops, palette[:, c]) for c in range(3)], axis=-1)


def generate_texture(size: int, rng: np.random.Generator) -> np.ndarray:
    """One procedural texture (the four families of the module docstring) as uint8 (size, size, 3)."""
    palette = rng.uniform(0, 255, size=(int(rng.integers(2, 5)), 3))
    family = int(rng.integers(4))
    if family == 0:  # fractal Perlin noise
        values = fractal_perlin(size, rng, base=int(2 ** rng.integers(0, 4)), octaves=int(rng.integers(2, 6)))
    elif family == 1:  # oriented grating, sine or square wave, slightly warped by noise
        angle, cycles = rng.uniform(0, np.pi), rng.uniform(2, 24)
        rows, cols = np.mgrid[0:size, 0:size] / size
        phase = 2 * np.pi * (cycles * (rows * np.cos(angle) + cols * np.sin(angle)) + rng.uniform())
        warp = 0.6 * rand_perlin_2d((size, size), (4, 4), rng)
        wave = np.sin(phase + warp)
        values = (wave > 0).astype(float) if rng.random() < 0.5 else 0.5 + 0.5 * wave
    elif family == 2:  # blobs: Perlin noise quantised into palette levels
        levels = len(palette)
        values = np.floor(fractal_perlin(size, rng, base=int(2 ** rng.integers(1, 4)), octaves=2) * levels)
        values = np.clip(values, 0, levels - 1) / max(levels - 1, 1)
    else:  # blurred grain
        grain = rng.normal(size=(size, size))
        values = normalise(ndimage.uniform_filter(grain, size=int(rng.integers(1, 6)), mode="wrap"))
    image = colour_map(values, palette) + rng.normal(0, rng.uniform(0, 12), size=(size, size, 3))
    return np.clip(np.round(image), 0, 255).astype(np.uint8)
