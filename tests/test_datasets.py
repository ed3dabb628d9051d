"""Dataset catalogs: layouts, records, shipped file lists, root resolution and file checks."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import fakes
import pytest

from ltbench.datasets import (
    ANOMALY,
    DATASETS,
    NORMAL,
    check_files,
    dagm,
    dataset_info,
    folder,
    mvtec,
    open_catalog,
    resolve_root,
    visa,
)
from ltbench.errors import DatasetError

pytestmark = pytest.mark.usefixtures("clean_env")

# train good / test good / test defective per class, from ../shared/notes/datasets.md
MVTEC_COUNTS = {
    "bottle": (209, 20, 63), "cable": (224, 58, 92), "capsule": (219, 23, 109), "carpet": (280, 28, 89),
    "grid": (264, 21, 57), "hazelnut": (391, 40, 70), "leather": (245, 32, 92), "metal_nut": (220, 22, 93),
    "pill": (267, 26, 141), "screw": (320, 41, 119), "tile": (230, 33, 84), "toothbrush": (60, 12, 30),
    "transistor": (213, 60, 40), "wood": (247, 19, 60), "zipper": (240, 32, 119),
}
VISA_TRAIN = {"candle": 900, "capsules": 542, "cashew": 450, "chewinggum": 453, "fryum": 450, "macaroni1": 900,
              "macaroni2": 900, "pcb1": 904, "pcb2": 901, "pcb3": 905, "pcb4": 904, "pipe_fryum": 450}


def test_class_orders_are_the_papers():
    assert mvtec.CLASS_ORDER == ["hazelnut", "leather", "bottle", "wood", "carpet", "tile", "metal_nut", "toothbrush",
                                 "zipper", "transistor", "grid", "pill", "capsule", "cable", "screw"]
    assert visa.CLASS_ORDER == ["pcb3", "pcb2", "pcb1", "pcb4", "macaroni1", "macaroni2", "candle", "cashew", "fryum",
                                "capsules", "chewinggum", "pipe_fryum"]
    assert dagm.CLASS_ORDER == ["Class10", "Class7", "Class9", "Class8", "Class2", "Class3", "Class5", "Class1",
                                "Class4", "Class6"]
    assert (mvtec.N_MAX, visa.N_MAX, dagm.N_MAX) == (391, 905, 1000)


def test_each_dataset_module_describes_itself():
    from ltbench.download import downloadable_datasets
    from ltbench.splits import PINNED_DIR

    for name in DATASETS:
        info = dataset_info(name)
        assert info.name == name and info.layout and info.licence_line().startswith(info.title)
        pinned = {path.stem for path in (PINNED_DIR / name).glob("*.json")}
        assert set(info.pinned_configs) == pinned, name          # the description names the shipped splits
    for module in (mvtec, visa, dagm):
        assert module.INFO.class_order == tuple(module.CLASS_ORDER) and module.INFO.n_max == module.N_MAX
        assert module.INFO.paper_benchmark
    assert [n for n in DATASETS if dataset_info(n).recipe_only] == ["dagm"]
    # sources and checksums from ../shared/notes/datasets.md
    assert downloadable_datasets() == ("mvtec", "visa", "dagm")
    assert [(s.filename, s.sha256) for s in mvtec.INFO.sources] == [
        ("mvtec_anomaly_detection.tar.xz", "cf4313b13603bec67abb49ca959488f7eedce2a9f7795ec54446c649ac98cd3d")]
    assert [(s.url, s.sha256) for s in visa.INFO.sources] == [
        ("https://amazon-visual-anomaly.s3.us-west-2.amazonaws.com/VisA_20220922.tar",
         "2eb8690c803ab37de0324772964100169ec8ba1fa3f7e94291c9ca673f40f362")]
    assert [s.filename for s in dagm.INFO.sources] == [f"Class{i}.zip" for i in range(1, 11)]
    assert {s.sha256 for s in dagm.INFO.sources} == {None}     # no checksum could be confirmed
    assert (visa.INFO.licence_id, mvtec.INFO.licence_id) == ("cc-by-4.0", "cc-by-nc-sa-4.0")
    with pytest.raises(DatasetError, match="unknown dataset 'mvtech'"):
        dataset_info("mvtech")


def test_mvtec_file_list_matches_published_counts():
    catalog = mvtec.catalog_from_file_list(Path("/nowhere"))
    for class_name, (train, test_good, test_bad) in MVTEC_COUNTS.items():
        assert len(catalog.train_normals(class_name)) == train
        tests = catalog.test_records(class_name)
        assert sum(r.label == NORMAL for r in tests) == test_good
        assert sum(r.label == ANOMALY for r in tests) == test_bad
        assert all((r.mask is None) == (r.label == NORMAL) for r in tests)
    assert max(len(catalog.train_normals(c)) for c in catalog.class_names) == mvtec.N_MAX
    assert len({(r.class_name, r.defect_type) for r in catalog.records if r.label == ANOMALY}) == 73
    assert len(mvtec.expected_files(Path("."))) == 5354 + 1258


def test_visa_file_list_matches_published_counts():
    records = visa.file_list_records()
    assert Counter((r.split, r.label) for r in records) == {("train", NORMAL): 8659, ("test", NORMAL): 962,
                                                           ("test", ANOMALY): 1200}
    catalog = visa.catalog_from_file_list(Path("/nowhere"))
    assert {c: len(catalog.train_normals(c)) for c in catalog.class_names} == VISA_TRAIN
    assert max(VISA_TRAIN.values()) == visa.N_MAX
    assert all(sum(r.label == ANOMALY for r in catalog.test_records(c)) == 100 for c in catalog.class_names)


def test_mvtec_catalog_of_a_small_tree(mvtec_tree):
    catalog = mvtec.read_catalog(mvtec_tree)
    assert catalog.dataset == "mvtec" and catalog.class_names == mvtec.CLASS_ORDER
    assert len(catalog.records) == 15 * (4 + 1 + 1)
    assert [r.image for r in catalog.train_normals("screw")] == [f"screw/train/good/{i:03d}.png" for i in range(4)]
    anomaly = [r for r in catalog.test_records("bottle") if r.label == ANOMALY]
    assert anomaly == [mvtec.Record("bottle", "test", ANOMALY, "crack", "bottle/test/crack/000.png",
                                    "bottle/ground_truth/crack/000_mask.png")]
    assert all(catalog.path(r.image).is_file() for r in catalog.records)


def test_mvtec_catalog_of_the_full_file_names_equals_the_shipped_list(mvtec_names_tree):
    catalog = mvtec.read_catalog(mvtec_names_tree)
    shipped = mvtec.catalog_from_file_list(mvtec_names_tree)
    assert sorted(catalog.records, key=lambda r: r.image) == sorted(shipped.records, key=lambda r: r.image)
    assert catalog.fingerprint() == shipped.fingerprint()


def test_mvtec_rejects_other_layouts_and_partial_roots(fast_path, mvtec_tree):
    (fast_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="is not an MVTec AD root: expected the MVTec AD layout"):
        mvtec.read_catalog(fast_path / "empty")
    shutil.rmtree(mvtec_tree / "screw")
    with pytest.raises(DatasetError, match="lacks the MVTec AD classes screw .*--dataset folder"):
        mvtec.read_catalog(mvtec_tree)


def test_missing_mask_is_named(mvtec_tree):
    (mvtec_tree / "tile" / "ground_truth" / "crack" / "000_mask.png").unlink()
    with pytest.raises(DatasetError, match=r"no ground-truth mask for tile/test/crack/000.png"):
        mvtec.read_catalog(mvtec_tree)


def test_visa_raw_layout(fast_path):
    root = fakes.make_visa_tree(fast_path / "visa", counts={c: 2 for c in visa.CLASS_ORDER})
    catalog = visa.read_catalog(root)
    assert visa.layout(root) == "raw" and catalog.class_names == visa.CLASS_ORDER
    assert [r.image for r in catalog.train_normals("pcb1")] == ["pcb1/Data/Images/Normal/0000.JPG",
                                                                "pcb1/Data/Images/Normal/0001.JPG"]
    tests = catalog.test_records("pcb1")
    assert [(r.label, r.image, r.mask) for r in tests] == [
        (ANOMALY, "pcb1/Data/Images/Anomaly/000.JPG", "pcb1/Data/Masks/Anomaly/000.png"),
        (NORMAL, "pcb1/Data/Images/Normal/0002.JPG", None),
    ]


def test_visa_converted_layout_maps_to_raw_paths(visa_converted_names_tree):
    root = visa_converted_names_tree
    catalog = visa.read_catalog(root)
    assert visa.layout(root) == "converted"
    assert {c: len(catalog.train_normals(c)) for c in catalog.class_names} == VISA_TRAIN
    bad = [r for r in catalog.records if r.label == ANOMALY]
    assert len(bad) == 1200 and all(r.defect_type == "bad" for r in bad)
    assert bad[0].mask == bad[0].image.replace("/test/bad/", "/ground_truth/bad/").replace(".JPG", ".png")
    raw = {r.image for r in visa.file_list_records()} | {r.mask for r in visa.file_list_records() if r.mask}
    converted = {r.image for r in catalog.records} | {r.mask for r in catalog.records if r.mask}
    assert {visa.canonical_path(p) for p in converted} == raw
    assert visa.canonical_path("candle/train/good/0836.JPG") == "candle/Data/Images/Normal/0836.JPG"
    assert visa.localize_paths(root, ["candle/Data/Images/Normal/0836.JPG"]) == ["candle/train/good/0836.JPG"]


def test_visa_rejects_other_layouts(mvtec_tree):
    with pytest.raises(DatasetError, match="is not a VisA root: expected the VisA layout: either the raw download"):
        visa.read_catalog(mvtec_tree)


@pytest.mark.parametrize("nested", [False, True])
def test_dagm_catalog_flat_and_nested(fast_path, nested):
    root = fakes.make_dagm_tree(fast_path / "dagm", nested=nested)
    catalog = dagm.read_catalog(root)
    prefix = "Class3/Class3" if nested else "Class3"
    assert catalog.class_names == dagm.CLASS_ORDER
    # training normals = Train rows with 0; the defective Train image is left out
    assert [r.image for r in catalog.train_normals("Class3")] == [f"{prefix}/Train/{i:04d}.PNG" for i in range(5)]
    assert len(catalog.train_normals("Class8")) == 10
    assert not any(r.split == "train" and r.label == ANOMALY for r in catalog.records)
    tests = catalog.test_records("Class3")
    assert [(r.label, r.image, r.mask) for r in tests] == [
        (NORMAL, f"{prefix}/Test/0006.PNG", None), (NORMAL, f"{prefix}/Test/0007.PNG", None),
        (ANOMALY, f"{prefix}/Test/0008.PNG", f"{prefix}/Test/Label/0008_label.PNG"),
    ]
    assert all(catalog.path(r.image).is_file() for r in catalog.records)


def test_dagm_errors_name_the_file(dagm_tree, fast_path):
    labels = dagm_tree / "Class2" / "Test" / "Label" / "Labels.txt"
    labels.write_text(labels.read_text() + "9\tmaybe\t0009.PNG\t0\t0\n")
    with pytest.raises(DatasetError, match=r"Class2/Test/Label/Labels.txt line 5 is not"):
        dagm.read_catalog(dagm_tree)
    labels.unlink()
    with pytest.raises(DatasetError, match=r"Class2/Test/Label/Labels.txt is missing"):
        dagm.read_catalog(dagm_tree)
    shutil.rmtree(dagm_tree / "Class4")
    with pytest.raises(DatasetError, match="lacks the DAGM classes Class4"):
        dagm.read_catalog(dagm_tree)
    (fast_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="is not a DAGM 2007 root: expected the DAGM 2007 layout"):
        dagm.read_catalog(fast_path / "empty")


def test_folder_class_order_and_mask_names(fast_path):
    root = fakes.make_mvtec_tree(fast_path / "products", counts={"bolt": 3, "gear": 7, "axle": 3}, mask_suffix="")
    catalog = folder.read_catalog(root)
    assert catalog.dataset == "folder"
    assert catalog.class_names == ["gear", "axle", "bolt"]  # by training normals, then name
    assert catalog.test_records("gear")[0].mask == "gear/ground_truth/crack/000.png"
    (fast_path / "nothing").mkdir()
    with pytest.raises(DatasetError, match="has no class folders: expected an MVTec-style layout"):
        folder.read_catalog(fast_path / "nothing")


def test_resolve_root_order_and_messages(fast_path, monkeypatch, mvtec_tree):
    assert resolve_root("mvtec", mvtec_tree) == (mvtec_tree, f"mvtec root {mvtec_tree} (from --root)")
    with pytest.raises(DatasetError, match=r"no root for dataset 'visa': pass --root DIR, or set LTBENCH_DATA"):
        resolve_root("visa", None)
    monkeypatch.setenv("LTBENCH_DATA", str(fast_path))
    path, source = resolve_root("mvtec", None)
    assert path == fast_path / "mvtec" and source.endswith("(from $LTBENCH_DATA/mvtec)")
    with pytest.raises(DatasetError, match=rf"visa root {fast_path / 'visa'} does not exist: pass --root DIR"):
        resolve_root("visa", None)
    with pytest.raises(DatasetError, match="unknown dataset 'kitti': use one of mvtec, visa, dagm, synth, folder"):
        resolve_root("kitti", fast_path)
    assert DATASETS == ("mvtec", "visa", "dagm", "synth", "folder")
    assert open_catalog("mvtec", mvtec_tree).fingerprint() == mvtec.read_catalog(mvtec_tree).fingerprint()


def test_check_files_reports_missing_and_unexpected(fast_path):
    root = fakes.make_mvtec_tree_from_file_list(fast_path / "mvtec")
    check = check_files("mvtec", root)
    assert (check.expected, check.missing, check.unexpected) == (6612, [], [])
    (root / "pill/test/crack/003.png").unlink()
    (root / "cable/ground_truth/combined/000_mask.png").unlink()
    fakes.touch_files(root, ["wood/train/good/999.png", "wood/readme.txt"])
    check = check_files("mvtec", root)
    assert check.missing == ["cable/ground_truth/combined/000_mask.png", "pill/test/crack/003.png"]
    assert check.unexpected == ["wood/train/good/999.png"]  # images only: readme.txt is not reported


def test_check_files_on_converted_visa_and_dagm(visa_converted_names_tree, dagm_tree):
    check = check_files("visa", visa_converted_names_tree)
    assert (check.expected, check.missing, check.unexpected) == (10821 + 1200, [], [])
    (dagm_tree / "Class5" / "Train" / "0002.PNG").unlink()
    check = check_files("dagm", dagm_tree)
    # every image (defective Train ones too) and mask named in Labels.txt
    assert check.expected == 6 * (5 + 1 + 2 + 1) + 4 * (10 + 1 + 2 + 1) + 10 * 2
    assert check.missing == ["Class5/Train/0002.PNG"] and check.unexpected == []


def test_check_files_rejects_a_root_with_nothing_of_the_dataset(fast_path):
    root = fakes.make_mvtec_tree(fast_path / "other", counts={"widget": 2})
    with pytest.raises(DatasetError, match="holds none of the 6612 files of mvtec: expected the MVTec AD layout"):
        check_files("mvtec", root)
