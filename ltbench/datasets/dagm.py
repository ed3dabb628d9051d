"""DAGM 2007 (Wieler & Hahn): ten texture classes indexed by `Label/Labels.txt` files.

Layout: `ClassN/{Train,Test}/NNNN.PNG`, masks `ClassN/{Train,Test}/Label/NNNN_label.PNG`, and
`ClassN/{Train,Test}/Label/Labels.txt` (a header line, then tab-separated rows: id, defective
0/1, image file, an unused column, mask file or 0). Extracted copies nested as
`ClassN/ClassN/Train` are accepted. Training normals are the `Train` rows with 0; the test set is
every `Test` row. Defective `Train` images are left out of the catalog: the unsupervised protocol
never trains on anomalies. No public copy of the `Labels.txt` files exists, so DAGM manifests are
built on the user's machine (only the recipe is pinned).
"""

from __future__ import annotations

from pathlib import Path

from ltbench.datasets import paper_class_order
from ltbench.datasets.base import ANOMALY, NORMAL, ArchiveSource, Catalog, DatasetInfo, Record
from ltbench.errors import DatasetError

CLASS_ORDER: list[str] = list(paper_class_order("dagm"))  # LTAD paper, Sec. 3 (long-tail order)
N_MAX = 1000  # classes 7-10 hold 1,000 normal training images; LTAD paper, Table 2
LAYOUT = ("the DAGM 2007 layout: Class1 ... Class10, each with Train/ and Test/ holding NNNN.PNG images and "
          "Label/Labels.txt (ClassN/ClassN/Train also accepted)")
_SPLITS = (("Train", "train"), ("Test", "test"))
_ZENODO_RECORD = "https://zenodo.org/records/8086136/files"
INFO = DatasetInfo(
    name="dagm",
    title="DAGM 2007 (Wieler & Hahn)",
    table_title="DAGM",
    licence_id="other",
    licence="terms LTBench could not confirm (check them at the source before use)",
    homepage="https://zenodo.org/records/8086136",
    citation=(
        "@inproceedings{wieler2007dagm,\n"
        "  title     = {Weakly Supervised Learning for Industrial Optical Inspection},\n"
        "  author    = {Wieler, Matthias and Hahn, Tobias},\n"
        "  booktitle = {29th Annual Symposium of the German Association for Pattern Recognition (DAGM)},\n"
        "  year      = {2007}\n"
        "}\n"
    ),
    layout=LAYOUT,
    class_order=tuple(CLASS_ORDER),
    n_max=N_MAX,
    # LTAD paper, Sec. 3 and Table 2; the reversed orders: Sec. 6, Fig. 8
    pinned_configs=tuple(f"{p}{b}" for p in ("exp", "step") for b in (50, 100, 200, 500))
    + ("exp200-reverse", "step200-reverse"),
    recipe_only=True,  # no public copy of the Labels.txt files: manifests are built on the user's machine
    paper_benchmark=True,
    # Zenodo record 8086136, one zip per class. No checksum of these files could be confirmed
    # offline, so none is pinned: the report carries the computed sha256 and md5 (Zenodo lists
    # md5 on the record page) for the user to compare, or the user pins them with --sha256.
    sources=tuple(ArchiveSource(f"Class{i}.zip", f"{_ZENODO_RECORD}/Class{i}.zip?download=1", None)
                  for i in range(1, 11)),
)


def class_folder(root: Path, class_name: str) -> str | None:
    """The folder of one class relative to root ("Class1" or nested "Class1/Class1"), or None."""
    for relative in (class_name, f"{class_name}/{class_name}"):
        if (Path(root) / relative / "Train").is_dir() and (Path(root) / relative / "Test").is_dir():
            return relative
    return None


def read_labels(root: Path, folder: str, split_dir: str) -> list[tuple[bool, str, str | None]]:
    """Rows of one `Labels.txt` as (defective, image path, mask path or None), paths relative to root.

    Raises `DatasetError` naming the file and line when it is missing or malformed.
    """
    labels = Path(root) / folder / split_dir / "Label" / "Labels.txt"
    if not labels.is_file():
        raise DatasetError(f"{labels} is missing: every DAGM class needs Train/Label/Labels.txt and "
                           f"Test/Label/Labels.txt; re-extract the class archive")
    rows = []
    lines = labels.read_text(encoding="utf-8", errors="replace").splitlines()
    for number, line in enumerate(lines[1:], start=2):
        fields = line.split()
        if not fields:
            continue
        if len(fields) < 4 or fields[1] not in ("0", "1"):
            raise DatasetError(f"{labels} line {number} is not 'id, defective 0/1, image, 0, mask': {line!r}; "
                               f"re-extract the class archive")
        defective = fields[1] == "1"
        mask = fields[-1] if fields[-1] != "0" else None
        if defective and mask is None:
            raise DatasetError(f"{labels} line {number} marks {fields[2]} defective but names no mask file; "
                               f"re-extract the class archive")
        rows.append((defective, f"{folder}/{split_dir}/{fields[2]}",
                     f"{folder}/{split_dir}/Label/{mask}" if mask else None))
    return rows


def _class_folders(root: Path) -> dict[str, str]:
    """Folder of every class; raises `DatasetError` naming the layout or the missing classes."""
    root = Path(root)
    folders = {c: class_folder(root, c) for c in CLASS_ORDER}
    missing = [c for c, f in folders.items() if f is None]
    if len(missing) == len(CLASS_ORDER):
        raise DatasetError(f"{root} is not a DAGM 2007 root: expected {LAYOUT}")
    if missing:
        raise DatasetError(f"{root} lacks the DAGM classes {', '.join(missing)} (no ClassN/Train and ClassN/Test): "
                           f"extract every ClassN.zip there")
    return folders  # type: ignore[return-value]


def expected_files(root: Path) -> set[str]:
    """Every image and mask named by the root's `Labels.txt` files (defective training images included)."""
    expected: set[str] = set()
    for folder in _class_folders(root).values():
        for split_dir, _ in _SPLITS:
            for _, image, mask in read_labels(root, folder, split_dir):
                expected.add(image)
                if mask:
                    expected.add(mask)
    return expected


def read_catalog(root: Path) -> Catalog:
    """Read a DAGM 2007 root (flat or nested class folders)."""
    root = Path(root)
    records: list[Record] = []
    for class_name, folder in _class_folders(root).items():
        for split_dir, split in _SPLITS:
            for defective, image, mask in read_labels(root, folder, split_dir):
                if split == "train" and defective:
                    continue
                records.append(Record(class_name, split, ANOMALY if defective else NORMAL,
                                      "defective" if defective else "good", image, mask))
    return Catalog("dagm", root, list(CLASS_ORDER), records)
