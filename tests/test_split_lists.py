"""`make-split --from-list`: pin a given image list (e.g. the authors' lists) as a manifest; the errors."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from ltbench.cli import main
from ltbench.split_lists import manifest_from_list, read_image_list
from ltbench.splits import PINNED_DIR, load_manifest

pytestmark = pytest.mark.usefixtures("clean_env")


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_error_line(result, exit_code: int = 1) -> str:
    assert result.exit_code == exit_code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in result.output, result.output
    return lines[0]


def pinned_rows(name: str) -> list[dict[str, str]]:
    with open(PINNED_DIR / f"{name}.csv", newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_round_trip_of_a_text_list_with_a_dataset_folder_prefix(tmp_path):
    rows = pinned_rows("mvtec/exp100")
    listed = tmp_path / "exp100.txt"
    lines = ["# the authors' list, paths under the extracted folder", ""]
    lines += [f"mvtec_anomaly_detection/{r['image']}" for r in reversed(rows)]  # any order
    lines[5] = lines[5].replace("/", "\\")  # a Windows-written line
    listed.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "mine.csv"
    result = run("make-split", "--dataset", "mvtec", "--from-list", listed, "--out", out)
    assert result.exit_code == 0, result.output

    manifest, pinned = load_manifest(out), load_manifest("mvtec/exp100")
    assert manifest.name == "mvtec/list-exp100" and manifest.profile == "list" and manifest.from_list
    assert [(r.class_name, r.image, r.group) for r in manifest.rows] == [
        (r.class_name, r.image, r.group) for r in pinned.rows]  # the same images, canonical paths, same groups
    # an exp list's counts fall along the paper's order, so High/Low by count is the paper's High/Low
    assert (manifest.class_order, manifest.high, manifest.low) == (pinned.class_order, pinned.high, pinned.low)
    assert out.read_bytes() == (PINNED_DIR / "mvtec" / "exp100.csv").read_bytes()  # the same CSV, byte for byte
    assert manifest.list_sha256 == hashlib.sha256(listed.read_bytes()).hexdigest()
    assert manifest.source_fingerprint == pinned.source_fingerprint  # checked against the official file list
    data = json.loads(out.with_suffix(".json").read_text())
    assert (data["list_file"], data["list_sha256"], data["profile"]) == ("exp100.txt", manifest.list_sha256, "list")
    assert "Images pinned from the list exp100.txt" in result.stdout

    shown = run("show-split", out)
    assert shown.exit_code == 0 and "pinned from the image list exp100.txt" in shown.stdout
    assert "High = the 7 classes with the most images" in shown.stdout


def test_csv_list_with_class_names_and_converted_visa_paths(tmp_path):
    rows = pinned_rows("visa/step100")
    listed = tmp_path / "step.csv"
    with open(listed, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["class_name", "image", "label"])
        for r in rows:
            converted = r["image"].replace("/Data/Images/Normal/", "/train/good/")
            writer.writerow([r["class_name"], f"VisA/{converted}", "normal"])
    out = tmp_path / "visa.csv"
    result = run("make-split", "--dataset", "visa", "--from-list", listed, "--out", out)
    assert result.exit_code == 0, result.output
    manifest, pinned = load_manifest(out), load_manifest("visa/step100")
    assert sorted(r.image for r in manifest.rows) == sorted(r.image for r in pinned.rows)  # raw (canonical) paths
    assert set(manifest.high) == set(pinned.high) and set(manifest.low) == set(pinned.low)
    # High by count: the step list's high classes keep min(905, available) images, most first
    counts = [manifest.counts[c] for c in manifest.class_order]
    assert counts == sorted(counts, reverse=True)


def test_high_low_by_count_with_ties_in_the_dataset_order(mvtec_names_tree, tmp_path):
    from ltbench.split_lists import list_catalog

    catalog = list_catalog("mvtec", None)
    listed = tmp_path / "two.txt"
    # two images of every class except screw (five): screw first, then the paper order
    lines = [r.image for c in catalog.class_names for r in catalog.train_normals(c)[:5 if c == "screw" else 2]]
    listed.write_text("\n".join(lines))
    manifest = manifest_from_list(listed, catalog)
    assert manifest.class_order == ["screw", *[c for c in catalog.class_names if c != "screw"]]
    assert manifest.high == manifest.class_order[:7] and manifest.low == manifest.class_order[7:]
    assert manifest.beta == 2.5 and manifest.n_max == 5


@pytest.mark.parametrize(("content", "fragments"), [
    ("hazelnut/train/good/000.png\nhazelnut/train/good/999.png\n",
     ["line 2", "hazelnut/train/good/999.png is not a file of mvtec's file list", "hazelnut/train/good/000.png"]),
    ("image,class_name\nhazelnut/train/good/000.png,hazelnut\nleather/train/good/000.png,walnut\n",
     ["line 3", "unknown class 'walnut'", "classes are hazelnut, leather"]),
    ("# nothing but a comment\n\n", ["holds no image paths", "one training image path per line"]),
    ("hazelnut/test/crack/000.png\n", ["line 1", "is a test anomalous image, not a normal training image"]),
    ("hazelnut/train/good/000.png\n./hazelnut/train/good/000.png\n", ["line 2", "listed twice (first on line 1)"]),
    ("image,class_name\nhazelnut/train/good/000.png,leather\n", ["is an image of class 'hazelnut', not 'leather'"]),
    ("hazelnut/train/good/000.png\n", ["has no image of the mvtec classes leather, bottle", "add them"]),
])
def test_list_errors_name_the_file_the_path_and_the_fix(tmp_path, content, fragments):
    listed = tmp_path / "bad.txt"
    listed.write_text(content)
    line = one_error_line(run("make-split", "--dataset", "mvtec", "--from-list", listed, "--out", tmp_path / "o.csv"))
    assert str(listed) in line
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    assert not (tmp_path / "o.csv").exists()


def test_csv_without_an_image_column_missing_file_and_recipe_flags(tmp_path):
    listed = tmp_path / "paths.csv"
    listed.write_text("path,cls\nhazelnut/train/good/000.png,hazelnut\n")
    line = one_error_line(run("make-split", "--dataset", "mvtec", "--from-list", listed))
    assert "CSV without an image column (header: path,cls)" in line and "name the column of image paths 'image'" in line
    assert "does not exist" in one_error_line(run("make-split", "--dataset", "mvtec", "--from-list", tmp_path / "no.txt"))
    usage = run("make-split", "--dataset", "mvtec", "--from-list", listed, "--type", "exp")
    assert usage.exit_code == 2 and "--type belong to the recipe" in usage.stderr
    assert run("make-split", "--dataset", "mvtec").exit_code == 2  # neither a recipe nor a list


def test_read_image_list_skips_comments_and_reads_a_bom(tmp_path):
    listed = tmp_path / "l.csv"
    listed.write_bytes("\ufeffimage\r\na/train/good/0.png\r\n\r\nb/train/good/1.png\r\n".encode())
    entries, raw = read_image_list(listed)
    assert [(n, p, c) for n, p, c in entries] == [(2, "a/train/good/0.png", None), (4, "b/train/good/1.png", None)]
    assert raw == listed.read_bytes()


def test_show_split_calls_the_pinned_splits_re_creations():
    shown = run("show-split", "mvtec/exp100")
    assert shown.exit_code == 0
    assert ("This pinned split is a re-creation of the LTAD paper's mvtec exp100 split: the paper's recipe "
            "(Sec. 3: exp, beta 100) with LTBench's own draw (seed 0), not the authors' image lists.") in shown.stdout
    assert "Zenodo record 10854201" in shown.stdout and "--from-list FILE" in shown.stdout
    synth = run("show-split", "synth/exp100")
    assert "Built by the paper's recipe" in synth.stdout and "Zenodo" not in synth.stdout


def test_list_manifest_opens_for_a_run_under_a_root(mvtec_names_tree, tmp_path):
    from ltbench.splits import open_split

    listed = tmp_path / "l.txt"
    listed.write_text("\n".join(r["image"] for r in pinned_rows("mvtec/step200")))
    out = tmp_path / "l.csv"
    result = run("make-split", "--dataset", "mvtec", "--from-list", listed, "--root", mvtec_names_tree, "--out", out)
    assert result.exit_code == 0, result.output
    manifest, catalog = open_split(out, mvtec_names_tree)
    assert catalog.root == Path(mvtec_names_tree) and len(manifest.rows) == len(pinned_rows("mvtec/step200"))
