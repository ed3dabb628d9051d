"""Any MVTec-layout folder, so that users can benchmark their own product images.

Layout: `<class>/train/good/*`, `<class>/test/good/*`, `<class>/test/<defect>/*` and
`<class>/ground_truth/<defect>/<stem>_mask.png` (or `<stem>.png`). The class order is derived
from the tree: classes sorted by number of normal training images, descending, then by name.
"""

from __future__ import annotations

from pathlib import Path

from ltbench.datasets import IMAGE_SUFFIXES
from ltbench.datasets.base import ANOMALY, NORMAL, Catalog, DatasetInfo, Record
from ltbench.errors import DatasetError

CLASS_ORDER: list[str] = []  # derived from each tree by `class_order(root)`
LAYOUT = ("an MVTec-style layout: <class>/train/good/<images>, <class>/test/<defect>/<images> and "
          "<class>/ground_truth/<defect>/<stem>_mask.png (or <stem>.png)")
INFO = DatasetInfo(
    name="folder",
    title="a local MVTec-layout folder",
    table_title="folder",
    licence_id="other",
    licence="the terms of whoever made the images (LTBench does not know them)",
    homepage="(local data)",
    citation="",
    layout=LAYOUT,
)


def _images_in(directory: Path) -> list[str]:
    """Image file names (by suffix, hidden files skipped) directly in `directory`, sorted."""
    if not directory.is_dir():
        return []
    return sorted(p.name for p in directory.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)


def _masks_by_stem(folder: Path) -> dict[str, str]:
    """Mask file names in one `ground_truth/<defect>` folder, keyed by file stem."""
    return {Path(name).stem: name for name in _images_in(folder)}


def _mask_for(masks: dict[str, str], class_name: str, defect: str, image_name: str, folder: Path) -> str:
    """The ground-truth mask of one defective test image, relative to root; raises if absent."""
    stem = Path(image_name).stem
    for wanted in (f"{stem}_mask", stem):
        if wanted in masks:
            return f"{class_name}/ground_truth/{defect}/{masks[wanted]}"
    raise DatasetError(f"no ground-truth mask for {class_name}/test/{defect}/{image_name}: expected "
                       f"{folder / (stem + '_mask.png')} or {folder / (stem + '.png')}; add the mask or "
                       f"remove the image")


def walk_mvtec_layout(root: Path, class_names: list[str]) -> list[Record]:
    """Records of every class folder `root/<class>` laid out as MVTec AD.

    Parameters: root: the dataset root; class_names: the class folders to read.
    Returns: train normals (`train/good`), test normals (`test/good`) and test anomalies
    (`test/<defect>`, each with its mask), paths relative to root.
    """
    records: list[Record] = []
    for class_name in class_names:
        for name in _images_in(root / class_name / "train" / "good"):
            records.append(Record(class_name, "train", NORMAL, "good", f"{class_name}/train/good/{name}"))
        test_dir = root / class_name / "test"
        defects = sorted(d.name for d in test_dir.iterdir() if d.is_dir() and not d.name.startswith(".")) \
            if test_dir.is_dir() else []
        for defect in defects:
            mask_folder = root / class_name / "ground_truth" / defect
            masks = _masks_by_stem(mask_folder) if defect != "good" else {}
            for name in _images_in(test_dir / defect):
                image = f"{class_name}/test/{defect}/{name}"
                if defect == "good":
                    records.append(Record(class_name, "test", NORMAL, "good", image))
                else:
                    records.append(Record(class_name, "test", ANOMALY, defect, image,
                                          _mask_for(masks, class_name, defect, name, mask_folder)))
    return records


def class_order(root: Path) -> list[str]:
    """Class folders of an MVTec-layout tree, by number of normal training images (desc.) then name."""
    classes = [d.name for d in Path(root).iterdir()
               if d.is_dir() and not d.name.startswith(".") and ((d / "train").is_dir() or (d / "test").is_dir())]
    return sorted(classes, key=lambda c: (-len(_images_in(Path(root) / c / "train" / "good")), c))


def read_catalog(root: Path) -> Catalog:
    """Read any MVTec-layout folder; raises `DatasetError` if no class folder has `train/` or `test/`."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"folder root {root} does not exist: pass --root DIR with {LAYOUT}")
    names = class_order(root)
    if not names:
        raise DatasetError(f"{root} has no class folders: expected {LAYOUT}")
    return Catalog("folder", root, names, walk_mvtec_layout(root, names))
