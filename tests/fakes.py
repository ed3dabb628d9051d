"""Builders of small fake dataset trees with real file names (plain functions; fixtures in conftest.py).

Each builder writes tiny but valid images (8x8 PNG/JPEG) and masks unless it says otherwise,
and returns the root it wrote.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from ltbench.datasets import mvtec, visa

IMAGE_SIZE = (8, 8)


def write_image(path: Path, value: int = 128, fmt: str = "PNG") -> Path:
    """A tiny grey image (8x8, mode L for PNG, RGB for JPEG)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = "RGB" if fmt == "JPEG" else "L"
    fill = (value, value, value) if mode == "RGB" else value
    Image.new(mode, IMAGE_SIZE, fill).save(path, format=fmt)
    return path


def write_mask(path: Path) -> Path:
    """A tiny binary mask: the left half anomalous (255), the right half background (0)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mask = Image.new("L", IMAGE_SIZE, 0)
    mask.paste(255, (0, 0, IMAGE_SIZE[0] // 2, IMAGE_SIZE[1]))
    mask.save(path, format="PNG")
    return path


def touch_files(root: Path, relative_paths) -> Path:
    """Create empty files at the given root-relative paths (fast stand-ins for real images)."""
    paths = [os.path.join(root, relative) for relative in relative_paths]
    for directory in {os.path.dirname(path) for path in paths}:
        os.makedirs(directory, exist_ok=True)
    for path in paths:
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o644))
    return root


def make_mvtec_tree(root: Path, counts: dict[str, int] | None = None, test_good: int = 1,
                    defects: tuple[str, ...] = ("crack",), per_defect: int = 1, mask_suffix: str = "_mask") -> Path:
    """An MVTec-layout tree: `<class>/train/good/NNN.png` (counts[class] images), `test/good`,
    `test/<defect>` and `ground_truth/<defect>/NNN<mask_suffix>.png`.

    Parameters: counts: training normals per class (default: 4 for each of MVTec's 15 classes).
    Also serves as a `folder` tree (any class names) and, with `mask_suffix=""`, a converted VisA tree.
    """
    counts = counts if counts is not None else {c: 4 for c in mvtec.CLASS_ORDER}
    for class_name, n_train in counts.items():
        for i in range(n_train):
            write_image(root / class_name / "train" / "good" / f"{i:03d}.png", value=i % 256)
        for i in range(test_good):
            write_image(root / class_name / "test" / "good" / f"{i:03d}.png")
        for defect in defects:
            for i in range(per_defect):
                write_image(root / class_name / "test" / defect / f"{i:03d}.png", value=255)
                write_mask(root / class_name / "ground_truth" / defect / f"{i:03d}{mask_suffix}.png")
    return root


def make_mvtec_tree_from_file_list(root: Path) -> Path:
    """Every MVTec AD image and mask path of the shipped file list, as empty files."""
    return touch_files(root, sorted(mvtec.expected_files(root)))


def make_visa_tree_from_file_list(root: Path, layout: str = "raw") -> Path:
    """Every VisA image and mask path of the official split, as empty files, in the raw or converted layout.

    The raw layout also gets `split_csv/1cls.csv` (a copy of the shipped split).
    """
    if layout == "raw":
        touch_files(root, sorted({r.image for r in visa.file_list_records()}
                                 | {r.mask for r in visa.file_list_records() if r.mask}))
        (root / "split_csv").mkdir(parents=True, exist_ok=True)
        (root / "split_csv" / "1cls.csv").write_bytes(visa.FILE_LIST.read_bytes())
        return root
    paths = []
    for record in visa.file_list_records():
        class_name, name = record.image.split("/")[0], record.image.split("/")[-1]
        paths.append(f"{class_name}/{record.split if record.label == 0 else 'test'}/"
                     f"{'good' if record.label == 0 else 'bad'}/{name}")
        if record.mask:
            paths.append(f"{class_name}/ground_truth/bad/{record.mask.split('/')[-1]}")
    return touch_files(root, paths)


def make_visa_tree(root: Path, counts: dict[str, int] | None = None, test_normal: int = 1,
                   anomalies: int = 1) -> Path:
    """A small raw VisA tree: `<class>/Data/Images/{Normal,Anomaly}/*.JPG`, `<class>/Data/Masks/Anomaly/*.png`
    and `split_csv/1cls.csv` (CRLF) listing them. Default: 3 training normals for each of the 12 classes."""
    counts = counts if counts is not None else {c: 3 for c in visa.CLASS_ORDER}
    rows = [["object", "split", "label", "image", "mask"]]
    for class_name, n_train in counts.items():
        for i in range(n_train + test_normal):
            image = f"{class_name}/Data/Images/Normal/{i:04d}.JPG"
            write_image(root / image, value=i % 256, fmt="JPEG")
            rows.append([class_name, "train" if i < n_train else "test", "normal", image, ""])
        for i in range(anomalies):
            image, mask = f"{class_name}/Data/Images/Anomaly/{i:03d}.JPG", f"{class_name}/Data/Masks/Anomaly/{i:03d}.png"
            write_image(root / image, value=255, fmt="JPEG")
            write_mask(root / mask)
            rows.append([class_name, "test", "anomaly", image, mask])
    (root / "split_csv").mkdir(parents=True, exist_ok=True)
    with open(root / "split_csv" / "1cls.csv", "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle, lineterminator="\r\n").writerows(rows)
    return root


DAGM_CLASSES = tuple(f"Class{i}" for i in range(1, 11))


def make_dagm_tree(root: Path, normals: dict[str, int] | None = None, train_defective: int = 1,
                   test_normal: int = 2, test_defective: int = 1, nested: bool = False) -> Path:
    """A small DAGM tree: `ClassN/{Train,Test}/NNNN.PNG`, `Label/NNNN_label.PNG` masks and `Label/Labels.txt`.

    Parameters: normals: training normals per class (default: Class1-6 get 5, Class7-10 get 10);
    nested: write `ClassN/ClassN/...` instead of `ClassN/...`.
    Labels.txt: a header line, then tab-separated `id, defective, image, 0, mask-or-0` rows.
    """
    normals = normals if normals is not None else {c: (5 if int(c[5:]) <= 6 else 10) for c in DAGM_CLASSES}
    for class_name in DAGM_CLASSES:
        base = root / class_name / class_name if nested else root / class_name
        number = 0
        for split_dir, n_normal, n_defective in (("Train", normals.get(class_name, 0), train_defective),
                                                 ("Test", test_normal, test_defective)):
            lines = ["1"]
            for index in range(n_normal + n_defective):
                defective = index >= n_normal
                name = f"{number:04d}.PNG"
                write_image(base / split_dir / name, value=255 if defective else 100)
                mask = "0"
                if defective:
                    mask = f"{number:04d}_label.PNG"
                    write_mask(base / split_dir / "Label" / mask)
                lines.append(f"{index + 1}\t{int(defective)}\t{name}\t0\t{mask}")
                number += 1
            (base / split_dir / "Label").mkdir(parents=True, exist_ok=True)
            (base / split_dir / "Label" / "Labels.txt").write_text("\n".join(lines) + "\n")
    return root


def make_synth_names_tree(root: Path) -> Path:
    """The file names of the built-in synthetic dataset (empty files) with its stamp, as
    `ltbench.datasets.synth.ensure_generated()` would write them; `synth.read_catalog` accepts it."""
    from ltbench.datasets import synth

    spec = synth.DEFAULT_SPEC
    paths = []
    for class_name in spec.classes:
        paths += [f"{class_name}/train/good/{i:03d}.png" for i in range(spec.n_train)]
        paths += [f"{class_name}/test/good/{i:03d}.png" for i in range(spec.n_test_good)]
        for defect in synth.DEFECTS[class_name]:
            paths += [f"{class_name}/test/{defect}/{i:03d}.png" for i in range(spec.n_test_per_defect)]
            paths += [f"{class_name}/ground_truth/{defect}/{i:03d}_mask.png" for i in range(spec.n_test_per_defect)]
    touch_files(root, paths)
    (root / synth.STAMP_NAME).write_text(json.dumps(spec.stamp()), encoding="utf-8")
    return root


# ----------------------------------------------------------------------------- a learnable tree

SPOT_CLASSES = {"alpha": 6, "beta": 3}  # normal training images per class (the folder order is by this count)
SPOT_GOOD, SPOT_BAD = 3, 3              # test images per class


def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def make_spot_tree(root: Path) -> Path:
    """Two classes of 32x32 images: a per-class colour with noise; anomalies carry a bright square."""
    rng = np.random.default_rng(0)
    for c, (name, n_train) in enumerate(SPOT_CLASSES.items()):
        base = np.array([60 + 100 * c, 120, 200 - 100 * c], dtype=np.float64)

        def image(base=base):
            return np.clip(base + rng.normal(0, 8, size=(32, 32, 3)), 0, 255).astype(np.uint8)

        def bright(picture: np.ndarray, i: int) -> tuple[slice, slice]:
            y, x = 4 + 6 * i, 8 + 5 * i
            picture[y:y + 8, x:x + 8] = 255
            return slice(y, y + 8), slice(x, x + 8)

        _write_spot_class(root / name, n_train, image, bright)
    return root


def _write_spot_class(folder: Path, n_train: int, image, spot) -> None:
    """One class in MVTec layout: `n_train` + SPOT_GOOD normal images, SPOT_BAD anomalous ones with masks.

    image() draws a (32, 32, 3) uint8 picture; spot(picture, i) paints anomaly i in place and returns its
    (rows, cols) slices. Images are drawn in file order, so a seeded `image` gives the same files as before.
    """
    for i in range(n_train):
        _save(folder / "train" / "good" / f"{i:03d}.png", image())
    for i in range(SPOT_GOOD):
        _save(folder / "test" / "good" / f"{i:03d}.png", image())
    for i in range(SPOT_BAD):
        picture, mask = image(), np.zeros((32, 32), dtype=np.uint8)
        mask[spot(picture, i)] = 255
        _save(folder / "test" / "spot" / f"{i:03d}.png", picture)
        _save(folder / "ground_truth" / "spot" / f"{i:03d}_mask.png", mask)


def make_varied_spot_tree(root: Path, classes: dict[str, int] | None = None) -> Path:
    """Two classes of 32x32 images, each image its own random colour, anomalies a faint (+60) square.

    A class mean then depends on which training images a split draws, so the test metrics of a
    class whose images are drawn (not all kept) move with the split's seed.
    """
    rng = np.random.default_rng(0)
    for name, n_train in (classes or {"alpha": 8, "beta": 4}).items():
        def image():
            colour = rng.uniform(40, 200, size=3)
            return np.clip(colour + rng.normal(0, 30, size=(32, 32, 3)), 0, 255).astype(np.uint8)

        def faint(picture: np.ndarray, i: int) -> tuple[slice, slice]:
            square = (slice(8, 16), slice(8 + 4 * i, 16 + 4 * i))
            picture[square] = np.clip(picture[square].astype(np.int64) + 60, 0, 255)
            return square

        _write_spot_class(root / name, n_train, image, faint)
    return root
