"""VisA (Zou et al., ECCV 2022): the raw download layout and the common MVTec-style conversion.

Raw: `<class>/Data/Images/{Normal,Anomaly}/*.JPG`, `<class>/Data/Masks/Anomaly/*.png` and the
official split `split_csv/1cls.csv` (shipped as `ltbench/data_files/visa_1cls.csv`; used when
the root has none). Converted (the authors' `prepare_data.py --split-type 1cls`):
`<class>/{train,test}/good`, `<class>/test/bad`, `<class>/ground_truth/bad/<stem>.png`; file
names are kept, so every converted path maps to one raw path. Manifests always hold the raw
("canonical") paths; `localize_paths` turns them into a converted root's paths.
Raw masks hold defect-type ids (0 = background): binarise them (non-zero = anomaly).
"""

from __future__ import annotations

import csv
from functools import lru_cache
from pathlib import Path

from ltbench.datasets import DATA_FILES, paper_class_order
from ltbench.datasets.base import ANOMALY, NORMAL, ArchiveSource, Catalog, DatasetInfo, Record
from ltbench.datasets.folder import walk_mvtec_layout
from ltbench.errors import DatasetError

CLASS_ORDER: list[str] = list(paper_class_order("visa"))  # LTAD paper, Sec. 3 (long-tail order)
N_MAX = 905  # largest class (pcb3 train normals); LTAD paper, Table 2
FILE_LIST = DATA_FILES / "visa_1cls.csv"
LAYOUT = ("the VisA layout: either the raw download (<class>/Data/Images/Normal/*.JPG, "
          "<class>/Data/Images/Anomaly/*.JPG, <class>/Data/Masks/Anomaly/*.png, split_csv/1cls.csv) or the "
          "converted one (<class>/train/good, <class>/test/good, <class>/test/bad, <class>/ground_truth/bad) "
          "for the 12 classes (pcb1, candle, ...)")
INFO = DatasetInfo(
    name="visa",
    title="VisA (Amazon)",
    table_title="VisA",
    licence_id="cc-by-4.0",
    licence="CC BY 4.0",
    homepage="https://github.com/amazon-science/spot-diff",
    citation=(
        "@inproceedings{zou2022spot,\n"
        "  title     = {{SPot-the-Difference} Self-Supervised Pre-training for Anomaly Detection and\n"
        "               Segmentation},\n"
        "  author    = {Zou, Yang and Jeong, Jongheon and Pemula, Latha and Zhang, Dongqing and\n"
        "               Dabeer, Onkar},\n"
        "  booktitle = {European Conference on Computer Vision (ECCV)},\n"
        "  year      = {2022}\n"
        "}\n"
    ),
    layout=LAYOUT,
    class_order=tuple(CLASS_ORDER),
    n_max=N_MAX,
    pinned_configs=tuple(f"{p}{b}" for p in ("exp", "step") for b in (100, 200, 500)),  # LTAD paper, Sec. 3
    paper_benchmark=True,
    sources=(ArchiveSource(
        "VisA_20220922.tar",
        "https://amazon-visual-anomaly.s3.us-west-2.amazonaws.com/VisA_20220922.tar",
        "2eb8690c803ab37de0324772964100169ec8ba1fa3f7e94291c9ca673f40f362"),),
)

# converted-layout folder <-> raw-layout folder, per class
_CONVERTED_TO_RAW = {
    "train/good": "Data/Images/Normal",
    "test/good": "Data/Images/Normal",
    "test/bad": "Data/Images/Anomaly",
    "ground_truth/bad": "Data/Masks/Anomaly",
}


def _read_split_csv(path: Path) -> tuple[Record, ...]:
    """Records of a VisA split file (`object,split,label,image,mask`, CRLF endings)."""
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
        return tuple(
            Record(row["object"], row["split"], NORMAL if row["label"] == "normal" else ANOMALY,
                   "good" if row["label"] == "normal" else "bad", row["image"], row["mask"] or None)
            for row in rows
        )
    except (KeyError, UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"{path} is not a VisA split file (expected the columns object,split,label,"
                           f"image,mask of split_csv/1cls.csv): {exc}; restore it from the download") from exc


@lru_cache(maxsize=1)
def file_list_records() -> tuple[Record, ...]:
    """Every VisA image as a `Record` (raw layout paths), from the shipped official split."""
    return _read_split_csv(FILE_LIST)


def catalog_from_file_list(root: Path) -> Catalog:
    """The catalog an intact raw VisA root would give, built from the shipped split (no images read)."""
    return Catalog("visa", Path(root), list(CLASS_ORDER), list(file_list_records()))


def layout(root: Path) -> str:
    """"raw" or "converted"; raises `DatasetError` (naming both layouts) if the root is neither."""
    root = Path(root)
    if (root / "split_csv" / "1cls.csv").is_file() or any((root / c / "Data" / "Images").is_dir()
                                                         for c in CLASS_ORDER):
        return "raw"
    if any((root / c / "train" / "good").is_dir() for c in CLASS_ORDER):
        return "converted"
    raise DatasetError(f"{root} is not a VisA root: expected {LAYOUT}")


def canonical_path(image: str) -> str:
    """The raw-layout path of a (possibly converted-layout) image or mask path."""
    parts = image.split("/")
    if len(parts) == 4 and f"{parts[1]}/{parts[2]}" in _CONVERTED_TO_RAW:
        return f"{parts[0]}/{_CONVERTED_TO_RAW[parts[1] + '/' + parts[2]]}/{parts[3]}"
    return image


def localize_paths(root: Path, images: list[str]) -> list[str]:
    """Raw-layout paths of normal training images as they are named under `root` (either layout)."""
    if layout(root) == "raw":
        return list(images)
    return [image.replace("/Data/Images/Normal/", "/train/good/", 1) for image in images]


def _converted_path(record_path: str, split: str) -> str:
    """The converted-layout path of a raw-layout image or mask path."""
    class_name, _, kind, folder, name = record_path.split("/")
    if kind == "Masks":
        sub = "ground_truth/bad"
    elif folder == "Anomaly":
        sub = "test/bad"
    else:
        sub = f"{split}/good"
    return f"{class_name}/{sub}/{name}"


def expected_files(root: Path) -> set[str]:
    """Every image and mask of the official split, named as in the root's layout."""
    records = file_list_records()
    paths = [(r.image, r.split) for r in records] + [(r.mask, r.split) for r in records if r.mask]
    if layout(root) == "raw":
        return {path for path, _ in paths}
    return {_converted_path(path, split) for path, split in paths}


def read_catalog(root: Path) -> Catalog:
    """Read a VisA root in either layout; raises `DatasetError` naming the expected layouts."""
    root = Path(root)
    kind = layout(root)
    if kind == "converted":
        present = [c for c in CLASS_ORDER if (root / c / "train" / "good").is_dir()]
        missing = [c for c in CLASS_ORDER if c not in present]
        if missing:
            raise DatasetError(f"{root} lacks the VisA classes {', '.join(missing)} (no <class>/train/good): "
                               f"convert the full dataset, or use --dataset folder for a subset")
        return Catalog("visa", root, list(CLASS_ORDER), walk_mvtec_layout(root, CLASS_ORDER))
    split_file = root / "split_csv" / "1cls.csv"
    records = _read_split_csv(split_file) if split_file.is_file() else file_list_records()
    missing = [c for c in CLASS_ORDER if not (root / c / "Data").is_dir()]
    if missing:
        raise DatasetError(f"{root} lacks the VisA classes {', '.join(missing)} (no <class>/Data): extract the "
                           f"full VisA_20220922.tar there, or use --dataset folder for a subset")
    return Catalog("visa", root, list(CLASS_ORDER), list(records))
