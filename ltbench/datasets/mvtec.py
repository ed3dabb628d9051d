"""MVTec AD (Bergmann et al., CVPR 2019): the standard layout, and the shipped official file list.

Layout: `<class>/train/good/NNN.png`, `<class>/test/<defect>/NNN.png`,
`<class>/ground_truth/<defect>/NNN_mask.png`. `ltbench/data_files/mvtec_files.csv` names every
file (no images), so pinned manifests are built and `ltbench verify` checks roots without them.
"""

from __future__ import annotations

import csv
from functools import lru_cache
from pathlib import Path

from ltbench.datasets import DATA_FILES, paper_class_order
from ltbench.datasets.base import ANOMALY, NORMAL, ArchiveSource, Catalog, DatasetInfo, Record
from ltbench.datasets.folder import walk_mvtec_layout
from ltbench.errors import DatasetError

CLASS_ORDER: list[str] = list(paper_class_order("mvtec"))  # LTAD paper, Sec. 3 (long-tail order)
N_MAX = 391  # largest class (hazelnut train/good); LTAD paper, Table 2
FILE_LIST = DATA_FILES / "mvtec_files.csv"
LAYOUT = ("the MVTec AD layout: <class>/train/good/000.png, <class>/test/<defect>/000.png and "
          "<class>/ground_truth/<defect>/000_mask.png for the 15 classes (hazelnut, leather, bottle, ...)")
INFO = DatasetInfo(
    name="mvtec",
    title="MVTec AD (MVTec Software GmbH)",
    table_title="MVTec",
    licence_id="cc-by-nc-sa-4.0",
    licence="CC BY-NC-SA 4.0 (non-commercial use only)",
    homepage="https://www.mvtec.com/company/research/datasets/mvtec-ad",
    citation=(
        "@inproceedings{bergmann2019mvtec,\n"
        "  title     = {{MVTec AD} -- A Comprehensive Real-World Dataset for Unsupervised Anomaly Detection},\n"
        "  author    = {Bergmann, Paul and Fauser, Michael and Sattlegger, David and Steger, Carsten},\n"
        "  booktitle = {IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},\n"
        "  year      = {2019}\n"
        "}\n"
        "@article{bergmann2021mvtec,\n"
        "  title   = {The {MVTec} Anomaly Detection Dataset: A Comprehensive Real-World Dataset for\n"
        "             Unsupervised Anomaly Detection},\n"
        "  author  = {Bergmann, Paul and Batzner, Kilian and Fauser, Michael and Sattlegger, David and\n"
        "             Steger, Carsten},\n"
        "  journal = {International Journal of Computer Vision},\n"
        "  volume  = {129},\n"
        "  pages   = {1038--1059},\n"
        "  year    = {2021}\n"
        "}\n"
    ),
    layout=LAYOUT,
    class_order=tuple(CLASS_ORDER),
    n_max=N_MAX,
    pinned_configs=("exp100", "exp200", "step100", "step200"),  # LTAD paper, Sec. 3 and Table 2
    paper_benchmark=True,
    # The link anomalib uses (MVTec has moved it several times; pass --url for a mirror).
    sources=(ArchiveSource(
        "mvtec_anomaly_detection.tar.xz",
        "https://www.mydrive.ch/shares/150996/b52ecdcbf521176e9db9c731f2304b27/download/420938113-1629960298/"
        "mvtec_anomaly_detection.tar.xz",
        "cf4313b13603bec67abb49ca959488f7eedce2a9f7795ec54446c649ac98cd3d"),),
)


@lru_cache(maxsize=1)
def file_list_records() -> tuple[Record, ...]:
    """Every MVTec AD image as a `Record`, from the shipped file list."""
    with open(FILE_LIST, newline="", encoding="utf-8") as handle:
        return tuple(
            Record(row["class_name"], row["split"], NORMAL if row["defect_type"] == "good" else ANOMALY,
                   row["defect_type"], row["image"], row["mask"] or None)
            for row in csv.DictReader(handle)
        )


def catalog_from_file_list(root: Path) -> Catalog:
    """The catalog an intact MVTec AD root would give, built from the shipped list (no images read)."""
    return Catalog("mvtec", Path(root), list(CLASS_ORDER), list(file_list_records()))


def expected_files(root: Path) -> set[str]:
    """Every image and mask of MVTec AD, relative to the root (one layout, so `root` is unused)."""
    records = file_list_records()
    return {r.image for r in records} | {r.mask for r in records if r.mask}


def read_catalog(root: Path) -> Catalog:
    """Read an MVTec AD root; raises `DatasetError` naming the expected layout or the missing classes."""
    root = Path(root)
    present = [c for c in CLASS_ORDER if (root / c / "train" / "good").is_dir()]
    if not present:
        raise DatasetError(f"{root} is not an MVTec AD root: expected {LAYOUT}; point --root at the folder "
                           f"that holds hazelnut/, bottle/, ...")
    missing = [c for c in CLASS_ORDER if c not in present]
    if missing:
        raise DatasetError(f"{root} lacks the MVTec AD classes {', '.join(missing)} (no <class>/train/good): "
                           f"extract the full dataset there, or use --dataset folder for a subset")
    return Catalog("mvtec", root, list(CLASS_ORDER), walk_mvtec_layout(root, CLASS_ORDER))
