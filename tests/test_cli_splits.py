"""CLI: make-split, list-splits, show-split, verify; every bad input gives one `Error:` line."""

from __future__ import annotations

import json
import shutil

import fakes
import pytest
from click.testing import CliRunner

from ltbench.cli import main
from ltbench.splits import PINNED_DIR, list_pinned, load_manifest

pytestmark = pytest.mark.usefixtures("clean_env")


def run(*args: str):
    """Invoke `ltbench ARGS` in-process; returns click's Result (stdout, stderr, exit_code)."""
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_error_line(result, exit_code: int, *fragments: str) -> None:
    """The command failed with `exit_code`, one `Error: ...` line on stderr holding each fragment, no traceback."""
    assert result.exit_code == exit_code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert "Traceback" not in result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit)


def test_done_when_make_split_on_mvtec_names_is_byte_identical(mvtec_names_tree, tmp_path):
    out = tmp_path / "X.csv"
    result = run("make-split", "--dataset", "mvtec", "--type", "exp", "--beta", "100", "--root", mvtec_names_tree,
                 "--out", out)
    assert result.exit_code == 0, result.output
    assert out.read_bytes() == (PINNED_DIR / "mvtec" / "exp100.csv").read_bytes()
    assert out.with_suffix(".json").read_bytes() == (PINNED_DIR / "mvtec" / "exp100.json").read_bytes()
    assert f"Using mvtec root {mvtec_names_tree} (from --root)." in result.stdout
    assert "Matches the pinned manifest mvtec/exp100" in result.stdout
    assert "  0  hazelnut    high      391    391" in result.stdout
    assert f"     total                1378   {len(load_manifest('mvtec/exp100').rows)}" in result.stdout


@pytest.mark.parametrize("dataset", ["visa", "mvtec"])
def test_make_split_without_a_root_uses_the_shipped_file_list(dataset, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the design's first command, as a new user types it
    result = run("make-split", "--dataset", dataset, "--type", "exp", "--beta", "200")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0] == (
        f"No root given: building from the official {dataset} file list shipped with LTBench "
        f"(check a local copy against it with: ltbench verify --dataset {dataset} --root DIR).")
    written = tmp_path / "splits-out" / dataset / "exp200.csv"
    assert written.read_bytes() == (PINNED_DIR / dataset / "exp200.csv").read_bytes()
    assert written.with_suffix(".json").read_bytes() == (PINNED_DIR / dataset / "exp200.json").read_bytes()
    assert f"Matches the pinned manifest {dataset}/exp200" in result.stdout


def test_make_split_without_a_root_but_ltbench_data_reads_that_copy(tmp_path, monkeypatch):
    monkeypatch.setenv("LTBENCH_DATA", str(tmp_path))  # $LTBENCH_DATA wins over the shipped list
    assert_one_error_line(run("make-split", "--dataset", "visa", "--type", "exp", "--beta", "200"), 1,
                          f"visa root {tmp_path / 'visa'} does not exist")


def test_make_split_default_output_and_ltbench_data(mvtec_tree, tmp_path, monkeypatch):
    monkeypatch.setenv("LTBENCH_DATA", str(mvtec_tree.parent))
    monkeypatch.chdir(tmp_path)
    result = run("make-split", "--dataset", "mvtec", "--type", "step", "--beta", "2", "--reverse", "--seed", "3")
    assert result.exit_code == 0, result.output
    assert "(from $LTBENCH_DATA/mvtec)" in result.stdout
    written = tmp_path / "splits-out" / "mvtec" / "step2-reverse-seed3.csv"
    manifest = load_manifest(written)
    assert manifest.reverse and manifest.seed == 3 and manifest.class_order[0] == "screw"
    # N_max is MVTec's 391: the high half keeps all 4 images, the low half floor(391/2) -> all 4 as well
    assert set(manifest.counts.values()) == {4}
    assert "No pinned manifest for mvtec/step2-reverse-seed3." in result.stdout


def test_make_split_on_dagm_records_realised_counts(dagm_tree, tmp_path):
    out = tmp_path / "dagm-exp100.csv"
    result = run("make-split", "--dataset", "dagm", "--type", "exp", "--beta", "100", "--root", dagm_tree, "--out", out)
    assert result.exit_code == 0, result.output
    meta = json.loads(out.with_suffix(".json").read_text())
    pinned = load_manifest("dagm/exp100")
    assert meta["target_counts"] == pinned.target_counts and meta["class_order"] == pinned.class_order
    available = {c: (5 if int(c[5:]) <= 6 else 10) for c in pinned.class_order}
    assert meta["counts"] == {c: min(pinned.target_counts[c], available[c]) for c in pinned.class_order}
    assert meta["source_fingerprint"] and meta["csv_sha256"]
    assert "Matches the pinned recipe dagm/exp100 (class order and target counts)" in result.stdout


def test_list_splits_lists_every_pinned_configuration():
    result = run("list-splits")
    assert result.exit_code == 0
    listed = [line.split()[0] for line in result.stdout.splitlines()[1:]]
    assert listed == list_pinned()
    assert "mvtec/exp100            exp        100  default        15  1342" in result.stdout
    assert "dagm/step200-reverse    step       200  reversed       10  recipe only" in result.stdout


def test_show_split_prints_counts_and_plots(tmp_path):
    manifest = load_manifest("visa/exp500")
    result = run("show-split", "visa/exp500", "--plot", tmp_path / "fig.png")
    assert result.exit_code == 0, result.output
    for i, class_name in enumerate(manifest.class_order):
        group = "high" if i < 6 else "low"
        assert f"{class_name:<10}  {group:<5}  {manifest.target_counts[class_name]:>6}  " \
               f"{manifest.counts[class_name]:>5}" in result.stdout
    assert (tmp_path / "fig.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["fig.png"]
    recipe = run("show-split", "dagm/exp200-reverse")
    assert recipe.exit_code == 0 and "Only the recipe is pinned" in recipe.stdout
    assert "  0  Class6   high     1000      -" in recipe.stdout


def test_verify_reports_missing_and_unexpected(fast_path):
    root = fakes.make_mvtec_tree_from_file_list(fast_path / "mvtec")
    ok = run("verify", "--dataset", "mvtec", "--root", root, "--split", "mvtec/step200")
    assert ok.exit_code == 0, ok.output
    assert "mvtec: 6612 files expected, 6612 present, 0 missing, 0 unexpected." in ok.stdout
    assert f"Split mvtec/step200: all {len(load_manifest('mvtec/step200').rows)} training images present." in ok.stdout
    fakes.touch_files(root, ["zipper/test/good/extra.png"])
    extra = run("verify", "--dataset", "mvtec", "--root", root)
    assert extra.exit_code == 0 and "zipper/test/good/extra.png" in extra.stdout
    (root / "screw/train/good/000.png").unlink()
    broken = run("verify", "--dataset", "mvtec", "--root", root)
    assert_one_error_line(broken, 1, "1 of 6612 files of mvtec are missing under", "screw/train/good/000.png",
                          "re-extract the dataset")


def test_verify_converted_visa_with_a_split(visa_converted_names_tree):
    result = run("verify", "--dataset", "visa", "--root", visa_converted_names_tree, "--split", "visa/step500")
    assert result.exit_code == 0, result.output
    assert "visa: 12021 files expected, 12021 present, 0 missing, 0 unexpected." in result.stdout


# ---- bad input: one line `Error: ...`, exit 1 (2 for click usage errors), nothing written ----

def test_unknown_dataset_lists_the_valid_ones(tmp_path):
    result = run("make-split", "--dataset", "kitti", "--type", "exp", "--beta", "100", "--out", tmp_path / "x.csv")
    assert_one_error_line(result, 1, "unknown dataset 'kitti'", "mvtec, visa, dagm, synth, folder")
    assert list(tmp_path.iterdir()) == []
    assert_one_error_line(run("verify", "--dataset", "kitti", "--root", tmp_path), 1, "unknown dataset 'kitti'")


def test_unknown_configuration_lists_the_valid_ones(tmp_path):
    assert_one_error_line(run("make-split", "--dataset", "mvtec", "--type", "log", "--beta", "100"), 1,
                          "unknown imbalance profile 'log'", "exp, step")
    assert_one_error_line(run("show-split", "mvtec/exp300"), 1, "'mvtec/exp300' is not pinned",
                          "mvtec/exp100, mvtec/exp200, mvtec/step100, mvtec/step200", "ltbench make-split")
    assert_one_error_line(run("show-split", "cifar10"), 1, "unknown split 'cifar10'", "visa/exp200")
    assert_one_error_line(run("verify", "--dataset", "mvtec", "--root", tmp_path, "--split", "visa/exp100"), 1,
                          "split visa/exp100 belongs to visa, not mvtec")


@pytest.mark.parametrize("beta", ["0.5", "0", "-3"])
def test_beta_below_one(beta, mvtec_tree, tmp_path):
    result = run("make-split", "--dataset", "mvtec", "--type", "exp", "--beta", beta, "--root", mvtec_tree,
                 "--out", tmp_path / "x.csv")
    assert_one_error_line(result, 1, f"beta={float(beta)} is invalid: use a number >= 1")
    assert list(tmp_path.iterdir()) == []


def test_beta_not_a_number_is_a_usage_error():
    result = run("make-split", "--dataset", "mvtec", "--type", "exp", "--beta", "lots")
    assert result.exit_code == 2 and "'lots' is not a valid float" in result.stderr
    assert "Traceback" not in result.output


def test_missing_root(tmp_path):
    # DAGM has no public file list and `folder` is any tree: both still need a root
    for dataset in ("dagm", "folder"):
        assert_one_error_line(run("make-split", "--dataset", dataset, "--type", "exp", "--beta", "100"), 1,
                              f"no root for dataset '{dataset}'", "pass --root DIR, or set LTBENCH_DATA")
    gone = tmp_path / "not-there"
    assert_one_error_line(run("verify", "--dataset", "mvtec", "--root", gone), 1,
                          f"mvtec root {gone} does not exist", "pass --root DIR")


def test_root_of_another_dataset_names_the_expected_layout(mvtec_tree, tmp_path):
    out = tmp_path / "x.csv"
    assert_one_error_line(run("make-split", "--dataset", "visa", "--type", "exp", "--beta", "100",
                              "--root", mvtec_tree, "--out", out), 1,
                          f"{mvtec_tree} is not a VisA root: expected the VisA layout", "split_csv/1cls.csv")
    assert_one_error_line(run("make-split", "--dataset", "dagm", "--type", "exp", "--beta", "100",
                              "--root", mvtec_tree, "--out", out), 1,
                          "is not a DAGM 2007 root", "Label/Labels.txt")
    assert_one_error_line(run("verify", "--dataset", "mvtec", "--root", tmp_path), 1,
                          "holds none of the 6612 files of mvtec", "<class>/ground_truth/<defect>/000_mask.png")
    assert not out.exists()


def test_class_without_normal_training_images(fast_path, tmp_path):
    root = fakes.make_mvtec_tree(fast_path / "products", counts={"gear": 5, "axle": 3, "bolt": 0})
    result = run("make-split", "--dataset", "folder", "--type", "exp", "--beta", "10", "--root", root,
                 "--out", tmp_path / "x.csv")
    assert_one_error_line(result, 1, "class 'bolt' has no normal training images under", "add some")
    assert list(tmp_path.iterdir()) == []


def test_manifest_that_does_not_match_its_hash(tmp_path):
    shutil.copy(PINNED_DIR / "mvtec" / "exp100.json", tmp_path / "exp100.json")
    lines = (PINNED_DIR / "mvtec" / "exp100.csv").read_text().splitlines(keepends=True)
    (tmp_path / "exp100.csv").write_text("".join(lines[:-1]))  # one row dropped
    assert_one_error_line(run("show-split", tmp_path / "exp100.csv"), 1,
                          "exp100.csv does not match the sha256 recorded in exp100.json", "rebuild the manifest")


def test_manifest_naming_missing_files(mvtec_tree, tmp_path):
    made = run("make-split", "--dataset", "mvtec", "--type", "exp", "--beta", "4", "--root", mvtec_tree,
               "--out", tmp_path / "mine.csv")
    assert made.exit_code == 0, made.output
    rows = load_manifest(tmp_path / "mine.csv").rows
    for row in rows[:4]:
        (mvtec_tree / row.image).unlink()
    result = run("verify", "--dataset", "mvtec", "--root", mvtec_tree, "--split", tmp_path / "mine.csv")
    assert "Missing files:" in result.stdout  # a small tree lacks most of MVTec AD, and the split's 4 images
    assert_one_error_line(result, 1, f"4 of {len(rows)} training images of split mvtec/exp4 are missing under "
                                     f"{mvtec_tree}, e.g. {rows[0].image}, {rows[1].image}, {rows[2].image}:")


def test_out_must_be_a_csv(mvtec_tree, tmp_path):
    result = run("make-split", "--dataset", "mvtec", "--type", "exp", "--beta", "100", "--root", mvtec_tree,
                 "--out", tmp_path / "x.txt")
    assert_one_error_line(result, 1, "x.txt must end in .csv")
    assert list(tmp_path.iterdir()) == []


def test_plot_to_an_unknown_format(tmp_path):
    assert_one_error_line(run("show-split", "mvtec/exp100", "--plot", tmp_path / "fig.gif"), 1,
                          "fig.gif", ".png, .pdf, .svg")
    assert list(tmp_path.iterdir()) == []
