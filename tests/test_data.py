"""The loader: images and masks at the evaluation size, errors that name the file, and RecordTrainSet."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ltbench.data import RecordTrainSet, evaluation_batches, load_image, load_mask, read_image_uint8
from ltbench.datasets.base import ANOMALY, NORMAL, Catalog, Record
from ltbench.errors import DatasetError


def _png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def test_load_image_is_rgb_float_224_and_matches_pillow_bilinear(tmp_path):
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, size=(40, 56, 3), dtype=np.uint8)
    path = _png(tmp_path / "a.png", array)
    image = load_image(path)
    assert image.shape == (3, 224, 224) and image.dtype == torch.float32
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    reference = np.asarray(Image.fromarray(array).resize((224, 224), Image.Resampling.BILINEAR), dtype=np.float32)
    np.testing.assert_allclose(image.permute(1, 2, 0).numpy(), reference / 255.0, atol=1e-6)


def test_greyscale_image_becomes_three_equal_channels(tmp_path):
    array = np.arange(224 * 224, dtype=np.uint32).reshape(224, 224) % 251
    path = _png(tmp_path / "grey.png", array.astype(np.uint8))
    image = load_image(path)
    assert image.shape == (3, 224, 224)
    assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])
    np.testing.assert_allclose(image[0].numpy(), array / 255.0, atol=1e-6)  # no resize at 224: exact


def test_load_mask_nearest_and_binarised(tmp_path):
    mask = np.zeros((112, 112), dtype=np.uint8)
    mask[10:20, 30:50] = 255
    mask[60, 60] = 1  # any non-zero value is an anomaly
    path = _png(tmp_path / "m.png", mask)
    loaded = load_mask(path, (112, 112))
    assert loaded.shape == (224, 224) and loaded.dtype == torch.bool
    expected = np.repeat(np.repeat(mask > 0, 2, axis=0), 2, axis=1)  # nearest upsampling by 2
    assert np.array_equal(loaded.numpy(), expected)
    assert int(loaded.sum()) == 4 * (10 * 20 + 1)


def test_load_mask_none_is_all_normal():
    mask = load_mask(None, (30, 40))
    assert mask.shape == (224, 224) and not mask.any()


def test_mask_of_other_size_names_the_mask(tmp_path):
    path = _png(tmp_path / "gt" / "bad_mask.png", np.zeros((16, 16), dtype=np.uint8))
    with pytest.raises(DatasetError) as error:
        load_mask(path, (32, 32))
    assert str(path) in str(error.value) and "16x16" in str(error.value) and "32x32" in str(error.value)


def test_corrupt_image_names_the_file(tmp_path):
    path = tmp_path / "corrupt.png"
    path.write_bytes(b"this is not an image at all" * 10)
    with pytest.raises(DatasetError) as error:
        load_image(path)
    assert str(path) in str(error.value) and "corrupt or truncated" in str(error.value)


def test_truncated_image_names_the_file(tmp_path):
    rng = np.random.default_rng(1)
    good = _png(tmp_path / "full.png", rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8))
    data = good.read_bytes()
    path = tmp_path / "truncated.png"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError) as error:
        load_image(path)
    assert str(path) in str(error.value)


def test_missing_image_names_the_file(tmp_path):
    with pytest.raises(DatasetError, match="nowhere.png"):
        load_image(tmp_path / "nowhere.png")


class _Manifest:
    """The three manifest fields RecordTrainSet reads."""

    def __init__(self, class_order, rows):
        self.class_order = class_order
        self.rows = rows


class _Row:
    def __init__(self, class_name, image):
        self.class_name, self.image = class_name, image


@pytest.fixture
def small_catalog(tmp_path):
    rows, records = [], []
    for c, name in enumerate(["b_class", "a_class"]):
        for i in range(5 - 2 * c):
            relative = f"{name}/train/good/{i:03d}.png"
            _png(tmp_path / relative, np.full((32, 32, 3), 20 * i + 100 * c, dtype=np.uint8))
            rows.append(_Row(name, relative))
            records.append(Record(name, "train", NORMAL, "good", relative))
    catalog = Catalog("folder", tmp_path, ["b_class", "a_class"], records)
    return catalog, _Manifest(["b_class", "a_class"], rows)


def test_train_set_batches_cover_every_image_once_in_a_seeded_order(small_catalog, tmp_path):
    catalog, manifest = small_catalog
    train = RecordTrainSet(catalog, manifest, "cpu", tmp_path / "ckpt")
    assert len(train) == 8 and train.class_names == ["b_class", "a_class"]
    assert train.device == torch.device("cpu") and train.checkpoint_dir == tmp_path / "ckpt"

    def values(seed, shuffle=True):
        out = []
        for images, class_idx in train.batches(3, shuffle=shuffle, seed=seed):
            assert images.dtype == torch.float32 and images.shape[1:] == (3, 224, 224)
            assert class_idx.dtype == torch.int64 and len(class_idx) == len(images) <= 3
            out += [(round(float(img[0, 0, 0]) * 255), int(c)) for img, c in zip(images, class_idx)]
        return out

    expected = sorted([(20 * i, 0) for i in range(5)] + [(20 * i + 100, 1) for i in range(3)])
    first = values(seed=0)
    assert sorted(first) == expected                  # every image exactly once, with its class index
    assert values(seed=0) == first                    # the same seed, the same order
    assert values(seed=1) != first                    # another seed, another order
    assert values(seed=5, shuffle=False) == [(20 * i, 0) for i in range(5)] + [(20 * i + 100, 1) for i in range(3)]


def test_run_seed_changes_the_shuffle(small_catalog, tmp_path):
    catalog, manifest = small_catalog
    a = RecordTrainSet(catalog, manifest, "cpu", tmp_path, seed=0).order(True, 3)
    b = RecordTrainSet(catalog, manifest, "cpu", tmp_path, seed=7).order(True, 3)
    assert sorted(a.tolist()) == sorted(b.tolist()) == list(range(8)) and not torch.equal(a, b)


def test_evaluation_batches_load_images_masks_and_classes(tmp_path):
    image = np.zeros((48, 48, 3), dtype=np.uint8)
    mask = np.zeros((48, 48), dtype=np.uint8)
    mask[:24] = 255
    _png(tmp_path / "x/test/good/0.png", image)
    _png(tmp_path / "x/test/cut/1.png", image + 50)
    _png(tmp_path / "x/ground_truth/cut/1_mask.png", mask)
    records = [Record("x", "test", NORMAL, "good", "x/test/good/0.png"),
               Record("x", "test", ANOMALY, "cut", "x/test/cut/1.png", "x/ground_truth/cut/1_mask.png")]
    catalog = Catalog("folder", tmp_path, ["x"], records)
    (batch,) = list(evaluation_batches(catalog, records, ["y", "x"], batch_size=4))
    assert batch.images.shape == (2, 3, 224, 224) and batch.class_idx.tolist() == [1, 1]
    assert not batch.masks[0].any() and int(batch.masks[1].sum()) == 112 * 224
    assert read_image_uint8(tmp_path / "x/test/cut/1.png")[1] == (48, 48)
