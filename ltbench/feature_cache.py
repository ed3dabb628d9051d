"""On-disk cache of frozen-encoder features, shared across epochs, runs and models.

The encoders are frozen, so the features of an image never change: computing them once and
reading them back for hundreds of epochs is where most of LTBench's training speed comes from.

Layout: `<root>/<backbone>-<digest[:16]>/<key[:2]>/<key>.safetensors`, one file per image, where
`key` = sha256 of the backbone name, the full weights digest, the input size and the image tensor
(float32 bytes and shape). A change to any of them is a different key, i.e. a miss. Each file holds
the float16 maps ("map.<layer>", (C, H, W)) and embedding ("embedding", (D,)) plus metadata with
the key and a sha256 of the tensor bytes; a file that does not parse, belongs to another key or
fails its checksum is recomputed and overwritten, never trusted. Files are written atomically
(temporary file + rename), so several processes can fill one cache at once.
Default root: `$LTBENCH_HOME/features` (`$LTBENCH_HOME` defaults to `~/.cache/ltbench`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor
from tqdm.auto import tqdm

from ltbench import distributed
from ltbench.backbones import Features, ImageEncoder
from ltbench.errors import BackboneError
from ltbench.io import write_bytes, write_json

FLOAT16_MAX = 65504.0  # larger activations are clamped so that the float16 copy stays finite
BACKBONE_INFO = "backbone.json"  # per-backbone folder: name, digest, layers (for `info`)
DEFAULT_BATCH_SIZE = 32  # images per encoder call when filling misses


def ltbench_home() -> Path:
    """`$LTBENCH_HOME`, default `~/.cache/ltbench`."""
    return Path(os.environ.get("LTBENCH_HOME") or "~/.cache/ltbench").expanduser()


def default_root() -> Path:
    """The default cache folder, `$LTBENCH_HOME/features`."""
    return ltbench_home() / "features"


def backbone_folder_name(encoder: ImageEncoder) -> str:
    """Folder of an encoder's entries: its name (made path-safe) and the first 16 hex of its digest."""
    return f"{re.sub(r'[^A-Za-z0-9._-]+', '_', encoder.name)}-{encoder.digest[:16]}"


class _CorruptEntry(Exception):
    """A cache file exists but cannot be trusted (internal: it is recomputed)."""


Entry = tuple[list[Tensor], Tensor]  # float16 maps (C, H, W) in layer order, embedding (D,)


class FeatureCache:
    """Per-image float16 features of frozen encoders on disk.

    Parameters: root: cache folder (default `$LTBENCH_HOME/features`); batch_size: images per encoder
    call when computing misses (bounds memory); progress: show tqdm bars for long work.
    Attributes: hits, misses, corrupt: counts since creation (corrupt entries also count as misses).
    """

    def __init__(self, root: str | os.PathLike | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
                 progress: bool = True) -> None:
        if batch_size < 1:
            raise BackboneError(f"FeatureCache batch_size must be at least 1, got {batch_size}")
        self.root = Path(root).expanduser() if root is not None else default_root()
        self.batch_size = batch_size
        self.progress = progress
        self.hits = 0
        self.misses = 0
        self.corrupt = 0

    # ---------------------------------------------------------------- keys and paths
    def key(self, encoder: ImageEncoder, image: Tensor) -> str:
        """Hex sha256 identifying the features of one image (3, H, W) under one encoder."""
        pixels = image.detach().to("cpu", torch.float32).contiguous()
        digest = hashlib.sha256(f"{encoder.name}\n{encoder.digest}\n{encoder.input_size}\n{tuple(pixels.shape)}\n".encode())
        digest.update(pixels.numpy())  # the float32 bytes, hashed in place
        return digest.hexdigest()

    def path(self, encoder: ImageEncoder, key: str) -> Path:
        """Where the entry with this key lives."""
        return self.root / backbone_folder_name(encoder) / key[:2] / f"{key}.safetensors"

    # ---------------------------------------------------------------- one entry
    @staticmethod
    def _checksum(tensors: Iterable[Tensor]) -> str:
        digest = hashlib.sha256()
        for tensor in tensors:
            digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())
        return digest.hexdigest()

    def _read(self, path: Path, encoder: ImageEncoder, key: str) -> Entry | None:
        """The entry at `path`, None when there is none; raises _CorruptEntry when it cannot be trusted."""
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            header_size = int.from_bytes(data[:8], "little")
            meta = json.loads(data[8:8 + header_size]).get("__metadata__") or {}
            tensors = load_safetensors(data)
            maps = [tensors[f"map.{name}"] for name in encoder.layer_names]
            embedding = tensors["embedding"]
        except Exception as exc:  # truncated or garbled files fail in many different ways
            raise _CorruptEntry(f"{path}: unreadable ({type(exc).__name__})") from exc
        if meta.get("key") != key or meta.get("checksum") != self._checksum([*maps, embedding]):
            raise _CorruptEntry(f"{path}: key or checksum mismatch")
        if [m.shape[0] for m in maps] != [encoder.channels[n] for n in encoder.layer_names] or \
                embedding.shape != (encoder.embed_dim,):
            raise _CorruptEntry(f"{path}: shapes do not match {encoder.name}")
        return maps, embedding

    def _write(self, path: Path, encoder: ImageEncoder, key: str, entry: Entry) -> None:
        maps, embedding = entry
        tensors = {f"map.{name}": m for name, m in zip(encoder.layer_names, maps)}
        tensors["embedding"] = embedding
        meta = {"key": key, "backbone": encoder.name, "digest": encoder.digest,
                "input_size": str(encoder.input_size), "layers": json.dumps(encoder.layer_names),
                "checksum": self._checksum([*maps, embedding])}
        write_bytes(path, save_safetensors(tensors, metadata=meta))

    def _describe(self, encoder: ImageEncoder) -> None:
        info_path = self.root / backbone_folder_name(encoder) / BACKBONE_INFO
        if not info_path.exists():
            write_json(info_path, {"name": encoder.name, "digest": encoder.digest,
                                   "input_size": encoder.input_size, "layers": encoder.layer_names,
                                   "channels": encoder.channels, "strides": encoder.strides,
                                   "embed_dim": encoder.embed_dim})

    # ---------------------------------------------------------------- encoding
    def encode(self, encoder: ImageEncoder, images: Tensor, progress: bool | None = None) -> Features:
        """Features of a batch, read from the cache where present, computed and stored otherwise.

        Parameters: encoder: a frozen image encoder; images: (B, 3, H, W) float RGB in [0, 1];
        progress: show a bar while computing misses (default: the cache's setting, and only when
        there is more than one encoder batch to compute).
        Returns: `Features` as `encoder.encode_image` would give them, but float16-rounded (hits and
        misses give identical values), float32 on the encoder's device.
        """
        if images.ndim != 4:
            raise BackboneError(f"FeatureCache.encode expects images (B, 3, H, W), got {tuple(images.shape)}")
        pixels = images.detach().to("cpu", torch.float32)
        keys = [self.key(encoder, image) for image in pixels]
        entries: list[Entry | None] = []
        for key in keys:
            try:
                entry = self._read(self.path(encoder, key), encoder, key)
            except _CorruptEntry:
                self.corrupt += 1
                entry = None
            entries.append(entry)
        missing = [i for i, entry in enumerate(entries) if entry is None]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing:
            self._describe(encoder)
            show = (self.progress if progress is None else progress) and len(missing) > self.batch_size
            show = show and distributed.info().is_main  # one bar per job, not per rank
            with tqdm(total=len(missing), desc=f"features {encoder.name}", unit="img", disable=not show,
                      leave=False) as bar:
                for start in range(0, len(missing), self.batch_size):
                    chunk = missing[start:start + self.batch_size]
                    computed = encoder.encode_image(pixels[chunk])
                    for row, index in enumerate(chunk):
                        entry = _to_float16([m[row] for m in computed.maps.values()], computed.embedding[row])
                        self._write(self.path(encoder, keys[index]), encoder, keys[index], entry)
                        entries[index] = entry
                    bar.update(len(chunk))
        return _assemble(encoder, entries)

    def encode_batches(self, encoder: ImageEncoder, batches: Iterable[Tensor],
                       total: int | None = None) -> Iterator[Features]:
        """Features for a stream of image batches, one batch in memory at a time, with a progress bar.

        Parameters: batches: iterable of (B, 3, H, W) image tensors (e.g. `(images for images, _ in
        train.batches(32, shuffle=False))`); total: number of images, for the bar's ETA.
        Yields: `Features` per batch, as `encode` returns them.
        """
        show = self.progress and distributed.info().is_main  # one bar per job, not per rank
        with tqdm(total=total, desc=f"features {encoder.name}", unit="img", disable=not show) as bar:
            for images in batches:
                yield self.encode(encoder, images, progress=False)
                bar.update(len(images))

    # ---------------------------------------------------------------- housekeeping
    def _backbone_folders(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir() if p.is_dir())

    def info(self) -> dict:
        """What the cache holds.

        Returns: {"root": str, "entries": int, "bytes": int, "backbones": {folder: {"name", "digest",
        "input_size", "layers", "entries", "bytes"}}}.
        """
        backbones = {}
        for folder in self._backbone_folders():
            files = list(folder.glob("*/*.safetensors"))
            described = folder / BACKBONE_INFO
            meta = json.loads(described.read_text()) if described.is_file() else {}
            backbones[folder.name] = {
                "name": meta.get("name", folder.name.rsplit("-", 1)[0]), "digest": meta.get("digest"),
                "input_size": meta.get("input_size"), "layers": meta.get("layers"),
                "entries": len(files), "bytes": sum(f.stat().st_size for f in files)}
        return {"root": str(self.root), "entries": sum(b["entries"] for b in backbones.values()),
                "bytes": sum(b["bytes"] for b in backbones.values()), "backbones": backbones}

    def clear(self, backbone: str | None = None) -> int:
        """Delete cached features (only the cache's own files), all or one backbone's.

        Parameters: backbone: a backbone name (e.g. "lite") or folder name; None for all.
        Returns: the number of entries deleted.
        """
        removed = 0
        for folder in self._backbone_folders():
            described = folder / BACKBONE_INFO
            name = json.loads(described.read_text()).get("name") if described.is_file() else None
            if backbone is not None and backbone not in (name, folder.name):
                continue
            for shard in [p for p in folder.iterdir() if p.is_dir()]:
                for file in shard.iterdir():
                    if file.suffix == ".safetensors" or file.name.endswith(".tmp"):
                        removed += file.suffix == ".safetensors"
                        file.unlink(missing_ok=True)
                _remove_if_empty(shard)
            described.unlink(missing_ok=True)
            _remove_if_empty(folder)
        return removed


def _half(t: Tensor) -> Tensor:
    return t.detach().clamp(-FLOAT16_MAX, FLOAT16_MAX).to(torch.float16)


def _to_float16(maps: list[Tensor], embedding: Tensor) -> Entry:
    return [_half(m).to("cpu").contiguous() for m in maps], _half(embedding).to("cpu").contiguous()


def as_stored(features: Features) -> Features:
    """Features rounded exactly as the cache stores them (clamped to float16, back to float32, same device).

    Use it on freshly computed features (e.g. at prediction time) so that they match cached ones bit for bit.
    """
    maps = OrderedDict((name, _half(m).float()) for name, m in features.maps.items())
    return Features(maps, _half(features.embedding).float())


def _assemble(encoder: ImageEncoder, entries: list[Entry]) -> Features:
    """Per-image float16 entries -> batched float32 `Features` on the encoder's device."""
    first_maps, first_embedding = entries[0]
    maps = [torch.empty((len(entries), *m.shape), dtype=torch.float32) for m in first_maps]  # (B, C, H, W)
    embedding = torch.empty((len(entries), *first_embedding.shape), dtype=torch.float32)  # (B, D)
    for row, (entry_maps, entry_embedding) in enumerate(entries):
        for batched, m in zip(maps, entry_maps):
            batched[row].copy_(m)  # float16 -> float32 in place: no stacked float16 intermediate
        embedding[row].copy_(entry_embedding)
    return Features(OrderedDict((name, m.to(encoder.device)) for name, m in zip(encoder.layer_names, maps)),
                    embedding.to(encoder.device))


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:  # not empty: something that is not ours, or another process just wrote there
        pass
