"""The built-in synthetic dataset: layout, exact masks, determinism, atomic generation, honesty."""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from ltbench.datasets import synth
from ltbench.datasets.base import ANOMALY, NORMAL
from ltbench.datasets.synth import spec, writer
from ltbench.errors import DatasetError
from ltbench.splits import load_manifest, target_counts

SMALL = {"classes": ["screw", "weave"], "n_train": 3, "n_test_good": 2, "n_test_per_defect": 2}


def tree_digest(root: Path) -> str:
    """sha256 over every file's relative path and bytes."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def small_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synth.generate(tmp_path_factory.mktemp("small") / "synth", workers=1, **SMALL)


def test_default_spec_is_the_promised_dataset() -> None:
    spec = synth.DEFAULT_SPEC
    assert list(spec.classes) == synth.CLASS_ORDER and len(synth.CLASS_ORDER) >= 10
    assert synth.N_MAX == 200 and spec.n_train == 200 and spec.seed == 0
    textures = [c for c in synth.CLASS_ORDER if c in synth.TEXTURES]
    assert 3 <= len(textures) <= len(synth.CLASS_ORDER) - 3
    kinds = {d for c in synth.CLASS_ORDER for d in synth.DEFECTS[c]}
    assert kinds == set(synth.DEFECT_KINDS) and len(kinds) >= 4
    counts = Counter((c, s, "good" if d == "good" else "anomaly") for c, s, d, _ in synth.sample_keys(spec))
    for c in synth.CLASS_ORDER:
        assert counts[(c, "train", "good")] == 200
        assert counts[(c, "test", "good")] >= 20
        assert counts[(c, "test", "anomaly")] >= 20
    # High and Low halves of the long-tail order both hold textures and objects
    half = len(synth.CLASS_ORDER) // 2
    for group in (synth.CLASS_ORDER[:half], synth.CLASS_ORDER[half:]):
        assert any(c in synth.TEXTURES for c in group) and any(c not in synth.TEXTURES for c in group)


def test_exact_file_counts_and_formats(small_root: Path) -> None:
    for class_name in SMALL["classes"]:
        base = small_root / class_name
        assert sorted(p.name for p in (base / "train" / "good").iterdir()) == ["000.png", "001.png", "002.png"]
        assert sorted(p.name for p in (base / "test" / "good").iterdir()) == ["000.png", "001.png"]
        assert sorted(p.name for p in (base / "test").iterdir()) == sorted(["good", *synth.DEFECTS[class_name]])
        for defect in synth.DEFECTS[class_name]:
            assert sorted(p.name for p in (base / "test" / defect).iterdir()) == ["000.png", "001.png"]
            masks = sorted(p.name for p in (base / "ground_truth" / defect).iterdir())
            assert masks == ["000_mask.png", "001_mask.png"]
            for index in range(2):
                with Image.open(base / "test" / defect / f"{index:03d}.png") as image:
                    assert image.mode == "RGB" and image.size == (224, 224)
                with Image.open(base / "ground_truth" / defect / f"{index:03d}_mask.png") as mask_file:
                    assert mask_file.mode == "L" and mask_file.size == (224, 224)
                    mask = np.asarray(mask_file)
                assert set(np.unique(mask)) == {0, 255} and (mask == 255).sum() >= 40
    stamp = json.loads((small_root / synth.STAMP_NAME).read_text())
    assert stamp["generator_version"] == synth.GENERATOR_VERSION and stamp["classes"] == ["weave", "screw"]
    assert not any(p.name.startswith(".") for p in small_root.parent.iterdir())   # no temporary left behind


def test_files_are_the_rendered_samples(small_root: Path) -> None:
    image, mask = synth.render_sample("screw", "test", "missing", 1)
    assert np.array_equal(np.asarray(Image.open(small_root / "screw/test/missing/001.png")), image)
    assert np.array_equal(np.asarray(Image.open(small_root / "screw/ground_truth/missing/001_mask.png")) == 255, mask)


# sha256 of `pixel_fingerprint()`, computed with GENERATOR_VERSION 1 before synth.py became a
# package: any change to what is drawn must bump GENERATOR_VERSION and this value together.
PIXELS_V1 = "c408fcb7294bd691e268890cfed1cd4f9861c83628c41867c4318cb8a3221f19"


def pixel_fingerprint() -> str:
    """sha256 over sample 3 of every class's train/good, test/good and test/<defect> images and masks."""
    digest = hashlib.sha256()
    for class_name in synth.CLASS_ORDER:
        for split, defect in [("train", "good"), ("test", "good")] + [("test", d) for d in synth.DEFECTS[class_name]]:
            image, mask = synth.render_sample(class_name, split, defect, 3, seed=0)
            digest.update(f"{class_name}/{split}/{defect}".encode())
            digest.update(image.tobytes())
            if mask is not None:
                digest.update(mask.tobytes())
    return digest.hexdigest()


def test_generated_pixels_are_pinned() -> None:
    assert synth.GENERATOR_VERSION == 1
    assert pixel_fingerprint() == PIXELS_V1


def test_read_catalog(small_root: Path) -> None:
    catalog = synth.read_catalog(small_root)
    assert catalog.dataset == "synth" and catalog.root == small_root
    assert catalog.class_names == ["weave", "screw"]                   # CLASS_ORDER order, not the order given
    assert len(catalog.records) == 2 * (3 + 2 + 3 * 2)
    for class_name in catalog.class_names:
        train = catalog.train_normals(class_name)
        assert [r.image for r in train] == [f"{class_name}/train/good/{i:03d}.png" for i in range(3)]
        test = catalog.test_records(class_name)
        assert Counter(r.label for r in test) == {NORMAL: 2, ANOMALY: 6}
        for record in test:
            assert catalog.path(record.image).is_file()
            if record.label == ANOMALY:
                stem = Path(record.image).stem
                assert record.defect_type in synth.DEFECTS[class_name]
                assert record.mask == f"{class_name}/ground_truth/{record.defect_type}/{stem}_mask.png"
                assert catalog.path(record.mask).is_file()
            else:
                assert record.defect_type == "good" and record.mask is None


def test_masks_mark_exactly_the_changed_pixels() -> None:
    for class_name in synth.CLASS_ORDER:
        for defect in synth.DEFECTS[class_name]:
            for index in (0, 5):
                image, mask = synth.render_sample(class_name, "test", defect, index)
                clean, no_mask = synth.render_sample(class_name, "test", defect, index, with_defect=False)
                assert no_mask is None and mask is not None and mask.sum() >= 40
                changed = (image != clean).any(axis=2)
                where = f"{class_name}/{defect}/{index}"
                assert not (changed & ~mask).any(), f"{where}: pixels changed outside the mask"
                assert changed[mask].mean() >= 0.98, f"{where}: only {changed[mask].mean():.3f} of the mask changed"
                assert mask.sum() <= 0.05 * mask.size, f"{where}: defect covers {mask.mean():.3f} of the image"


def test_generation_is_deterministic(small_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    again = synth.generate(tmp_path / "again", workers=2, **SMALL)           # forked processes, same bytes
    assert tree_digest(again) == tree_digest(small_root)
    monkeypatch.setattr(threading, "active_count", lambda: 2)         # where fork is unsafe: threads
    threaded = synth.generate(tmp_path / "threaded", workers=2, **SMALL)
    assert tree_digest(threaded) == tree_digest(small_root)
    monkeypatch.undo()
    assert synth.read_catalog(again).fingerprint() == synth.read_catalog(small_root).fingerprint()
    other_seed = synth.generate(tmp_path / "seed1", seed=1, workers=1, **SMALL)
    first = (small_root / "weave/train/good/000.png").read_bytes()
    assert (other_seed / "weave/train/good/000.png").read_bytes() != first


def test_images_vary_naturally() -> None:
    for class_name in synth.CLASS_ORDER:
        a, _ = synth.render_sample(class_name, "train", "good", 0)
        b, _ = synth.render_sample(class_name, "train", "good", 1)
        assert np.abs(a.astype(int) - b.astype(int)).mean() > 4, f"{class_name}: two normals nearly identical"


@pytest.mark.parametrize("damage", ["image", "mask", "stamp", "stray class", "stray defect", "bad stamp"])
def test_read_catalog_rejects_a_broken_tree(small_root: Path, tmp_path: Path, damage: str) -> None:
    root = Path(shutil.copytree(small_root, tmp_path / "synth"))
    if damage == "image":
        (root / "weave/train/good/001.png").unlink()
    elif damage == "mask":
        (root / "screw/ground_truth/scratch/000_mask.png").unlink()
    elif damage == "stamp":
        (root / synth.STAMP_NAME).unlink()
    elif damage == "stray class":
        (root / "nut" / "train" / "good").mkdir(parents=True)
    elif damage == "stray defect":
        (root / "weave/test/crack").mkdir()
    else:
        (root / synth.STAMP_NAME).write_text(json.dumps({"dataset": "synth", "classes": ["weave"]}))
    with pytest.raises(DatasetError, match="synth"):
        synth.read_catalog(root)


def test_read_catalog_on_a_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="not found"):
        synth.read_catalog(tmp_path / "nowhere")


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="classes"):
        synth.generate(tmp_path / "x", classes=["weave", "hazelnut"])
    with pytest.raises(DatasetError, match="n_train"):
        synth.generate(tmp_path / "x", n_train=0)
    with pytest.raises(DatasetError, match="seed"):
        synth.generate(tmp_path / "x", seed=-1)
    with pytest.raises(DatasetError, match="no train/scratch"):
        synth.render_sample("screw", "train", "scratch", 0)
    assert not (tmp_path / "x").exists()


def test_generate_never_overwrites_foreign_data(tmp_path: Path) -> None:
    root = tmp_path / "synth"
    root.mkdir()
    (root / "mine.txt").write_text("keep")
    with pytest.raises(DatasetError, match="refusing"):
        synth.generate(root, workers=1, **SMALL)
    assert [p.name for p in root.iterdir()] == ["mine.txt"]


def test_interrupted_generation_leaves_no_half_dataset(small_root: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    root = Path(shutil.copytree(small_root, tmp_path / "synth"))
    before = tree_digest(root)
    real = writer.render_sample
    calls = {"n": 0}

    def failing(*args: object, **kwargs: object) -> tuple[np.ndarray, np.ndarray | None]:
        calls["n"] += 1
        if calls["n"] > 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(writer, "render_sample", failing)
    with pytest.raises(KeyboardInterrupt):                       # regenerating over a good root
        synth.generate(root, workers=1, **SMALL)
    assert tree_digest(root) == before                           # the old root is untouched
    calls["n"] = 0
    with pytest.raises(KeyboardInterrupt):                       # generating a new root
        synth.generate(tmp_path / "fresh", workers=1, **SMALL)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synth"]   # no root, no temporary


def test_a_root_written_meanwhile_by_another_process_is_kept(tmp_path: Path) -> None:
    root = tmp_path / "synth"
    tiny = {"classes": ["cap"], "n_train": 1, "n_test_good": 1, "n_test_per_defect": 1}

    def other_process_finishes_first(done: int, total: int) -> None:
        if not root.exists():
            synth.generate(root, workers=1, **tiny)

    synth.generate(root, workers=1, progress=other_process_finishes_first, **tiny)
    first_stamp = (root / synth.STAMP_NAME).stat().st_ino
    assert synth.read_catalog(root).class_names == ["cap"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synth"]
    synth.generate(root, workers=1, **tiny)                      # an explicit call does rewrite it
    assert (root / synth.STAMP_NAME).stat().st_ino != first_stamp


def test_ensure_generated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tiny = synth.SynthSpec(classes=("pcb",), n_train=2, n_test_good=1, n_test_per_defect=1)
    monkeypatch.setattr(spec, "DEFAULT_SPEC", tiny)      # what is_generated compares with
    monkeypatch.setattr(writer, "DEFAULT_SPEC", tiny)    # what ensure_generated writes
    monkeypatch.setenv("LTBENCH_HOME", str(tmp_path / "home"))
    assert not synth.is_generated()
    root = synth.ensure_generated()
    assert synth.is_generated() and synth.is_generated(tmp_path / "home")
    assert root == tmp_path / "home" / "synth"
    assert synth.read_catalog(root).class_names == ["pcb"]
    stamp_time = (root / synth.STAMP_NAME).stat().st_mtime_ns
    assert synth.ensure_generated(tmp_path / "home") == root          # up to date: nothing rewritten
    assert (root / synth.STAMP_NAME).stat().st_mtime_ns == stamp_time
    monkeypatch.setattr(spec, "GENERATOR_VERSION", synth.GENERATOR_VERSION + 1)
    assert not synth.is_generated()
    synth.ensure_generated()                                          # a changed generator regenerates
    assert json.loads((root / synth.STAMP_NAME).read_text())["generator_version"] == spec.GENERATOR_VERSION
    foreign = tmp_path / "other" / "synth"
    foreign.mkdir(parents=True)
    (foreign / "photo.png").write_bytes(b"not ours")
    with pytest.raises(DatasetError, match="not a generated synth dataset"):
        synth.ensure_generated(tmp_path / "other")


def mean_image_auroc(class_name: str, train_indices: list[int]) -> float:
    """Image AUROC of scoring each test image by its L2 distance to the mean of the given normal train images."""
    train = [synth.render_sample(class_name, "train", "good", i)[0] for i in train_indices]
    mean = np.mean(np.stack(train).astype(np.float64), axis=0)
    keys = [("good", i) for i in range(synth.N_TEST_GOOD)]
    keys += [(d, i) for d in synth.DEFECTS[class_name] for i in range(synth.N_TEST_PER_DEFECT)]
    scores = [np.linalg.norm(synth.render_sample(class_name, "test", d, i)[0] - mean) for d, i in keys]
    labels = [int(d != "good") for d, _ in keys]
    return float(roc_auc_score(labels, scores))


def test_mean_image_baseline_fails_on_exp100() -> None:
    """Honesty: pixel distance to a class's mean training image (of the pinned synth/exp100 split) must
    not detect the defects; the test images are rendered exactly as the files are written."""
    manifest = load_manifest("synth/exp100")
    assert manifest.class_order == synth.CLASS_ORDER and manifest.counts["weave"] == 200
    selected: dict[str, list[int]] = {c: [] for c in manifest.class_order}
    for row in manifest.rows:
        assert row.image == f"{row.class_name}/train/good/{Path(row.image).stem}.png"
        selected[row.class_name].append(int(Path(row.image).stem))
    assert [len(selected[c]) for c in manifest.class_order] == target_counts(200, 12, "exp", 100)
    with writer._pool(2) as pool:
        aurocs = list(pool.map(mean_image_auroc, manifest.class_order, [selected[c] for c in manifest.class_order]))
    assert np.mean(aurocs) < 0.9, dict(zip(manifest.class_order, aurocs))
