"""The long-tailed split recipe, sampling, manifests, pinned splits and open_split."""

from __future__ import annotations

import json
import random
import zlib
from fractions import Fraction
from pathlib import Path

import fakes
import numpy as np
import pytest

from ltbench.datasets import NORMAL, Catalog, Record, dagm, mvtec, visa
from ltbench.errors import SplitError
from ltbench.io import sha256_file
from ltbench.splits import (
    PINNED_DIR,
    RECIPE_VERSION,
    build_split,
    class_generator,
    config_name,
    list_pinned,
    load_manifest,
    open_split,
    parse_config,
    rebuild_pinned,
    sample_without_replacement,
    target_counts,
)

pytestmark = pytest.mark.usefixtures("clean_env")


def reference_counts(n_max: int, n_classes: int, profile: str, beta: float) -> list[int]:
    """The recipe in exact integer arithmetic (independent of the library's floats), beta = p/q.

    exp: n_i is the largest k with k^(C-1) * p^i <= n_max^(C-1) * q^i (binary search);
    step: n_max for the first floor(C/2) classes, then floor(n_max * q / p). Both at least 1.
    """
    p, q = Fraction(beta).numerator, Fraction(beta).denominator
    exponent = n_classes - 1
    counts = []
    for i in range(n_classes):
        if profile == "step":
            k = n_max if i < n_classes // 2 else n_max * q // p
        else:
            bound, low, high = n_max ** exponent * q ** i, 0, n_max
            while low < high:
                middle = (low + high + 1) // 2
                low, high = (middle, high) if middle ** exponent * p ** i <= bound else (low, middle - 1)
            k = low
        counts.append(max(1, k))
    return counts


def memory_catalog(available: dict[str, int], dataset: str = "folder", shuffle_seed: int | None = None) -> Catalog:
    """A catalog of `available[c]` training normals per class (no files), class order as given."""
    records = [Record(c, "train", NORMAL, "good", f"{c}/train/good/{i:03d}.png")
               for c, n in available.items() for i in range(n)]
    records += [Record(c, "test", NORMAL, "good", f"{c}/test/good/000.png") for c in available]
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(records)
    return Catalog(dataset, Path("/nowhere"), list(available), records)


@pytest.mark.parametrize("profile", ["exp", "step"])
def test_target_counts_equal_the_exact_recipe(profile):
    for n_max in (1, 7, 64, 391, 905, 1000):
        for n_classes in (2, 3, 4, 5, 10, 12, 15):
            for beta in (1, 2, 2.5, 10, 50, 100, 200, 500, 1000):
                assert target_counts(n_max, n_classes, profile, beta) == \
                    reference_counts(n_max, n_classes, profile, beta), (n_max, n_classes, beta)


def test_target_counts_hit_exact_integers():
    # 1000 * 1000^(-i/3) = 1000, 100, 10, 1 exactly: float rounding must not floor them down
    assert target_counts(1000, 4, "exp", 1000) == [1000, 100, 10, 1]
    assert target_counts(1000, 3, "exp", 100) == [1000, 100, 10]


@pytest.mark.parametrize("bad", [
    (("exp", 0.99), "beta=0.99 is invalid: use a number >= 1"),
    (("exp", float("nan")), "beta=nan is invalid"),
    (("linear", 10), "unknown imbalance profile 'linear': use one of exp, step"),
])
def test_bad_recipes_are_refused(bad):
    (profile, beta), message = bad
    with pytest.raises(SplitError, match=message):
        target_counts(100, 5, profile, beta)
    with pytest.raises(SplitError, match="at least 2 classes"):
        target_counts(100, 1, "exp", 10)


@pytest.mark.parametrize("profile", ["exp", "step"])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("beta", [1, 3, 10, 100])
def test_build_split_counts_groups_and_rows(profile, reverse, beta):
    available = {"a": 40, "b": 12, "c": 35, "d": 3, "e": 20}  # order a..e; N_max = 40 (largest class)
    catalog = memory_catalog(available)
    manifest = build_split(catalog, profile, beta, reverse=reverse, seed=0)
    order = list(reversed(available)) if reverse else list(available)
    targets = reference_counts(40, 5, profile, beta)
    assert manifest.class_order == order and manifest.n_max == 40
    assert manifest.target_counts == dict(zip(order, targets))
    assert manifest.counts == {c: min(t, available[c]) for c, t in zip(order, targets)}
    assert manifest.high == order[:2] and manifest.low == order[2:]
    assert manifest.config == config_name(profile, beta, reverse) and manifest.name == f"folder/{manifest.config}"
    # rows: class order, then image path; each a distinct training normal of its class, with its group
    assert [r.class_name for r in manifest.rows] == [c for c in order for _ in range(manifest.counts[c])]
    for class_name in order:
        images = [r.image for r in manifest.rows if r.class_name == class_name]
        assert images == sorted(set(images))
        assert set(images) <= {r.image for r in catalog.train_normals(class_name)}
    assert all(r.group == manifest.group_of(r.class_name) for r in manifest.rows)
    assert manifest.source_fingerprint == catalog.fingerprint()


def test_same_seed_same_files_other_seed_other_files_same_counts():
    catalog = memory_catalog({"a": 60, "b": 50, "c": 40, "d": 30})
    first, again = build_split(catalog, "exp", 10), build_split(catalog, "exp", 10)
    other = build_split(catalog, "exp", 10, seed=1)
    assert first.rows == again.rows and first.csv_sha256 == again.csv_sha256
    assert other.counts == first.counts
    partial = [c for c in first.class_order if first.counts[c] < 60 and first.counts[c] < len(catalog.train_normals(c))]
    assert partial, "the test needs classes that are subsampled"
    for class_name in partial:
        assert {r.image for r in first.rows if r.class_name == class_name} != \
            {r.image for r in other.rows if r.class_name == class_name}
    assert other.config == "exp10-seed1" and parse_config("exp10-seed1") == ("exp", 10.0, False, 1)


def test_draw_ignores_record_order_and_other_classes():
    base = build_split(memory_catalog({"a": 100, "b": 100, "c": 50}), "step", 10)
    shuffled = build_split(memory_catalog({"a": 100, "b": 100, "c": 50}, shuffle_seed=3), "step", 10)
    assert shuffled.rows == base.rows
    # class b shrinks, so its draw changes; class c (same count, 10) keeps exactly the same images
    changed = build_split(memory_catalog({"a": 100, "b": 60, "c": 50}), "step", 10)
    images_c = {r.image for r in base.rows if r.class_name == "c"}
    assert len(images_c) == 10 and images_c == {r.image for r in changed.rows if r.class_name == "c"}


def test_sampling_is_the_documented_recipe_and_uniform():
    candidates = [f"x/{i:02d}.png" for i in range(10)]
    for seed in range(5):
        keys = np.random.default_rng([seed, zlib.crc32(b"screw")]).random(10)
        expected = sorted(candidates[i] for i in np.argsort(keys, kind="stable")[:3])
        assert sample_without_replacement(candidates, 3, class_generator(seed, "screw")) == expected
    hits = {c: 0 for c in candidates}
    for seed in range(2000):
        for image in sample_without_replacement(candidates, 3, class_generator(seed, "screw")):
            hits[image] += 1
    # each image is kept with probability 3/10: 600 expected per image, standard deviation about 20.5
    assert all(518 <= n <= 682 for n in hits.values()), hits


def test_a_class_without_normal_training_images_is_refused():
    catalog = memory_catalog({"a": 5, "b": 0, "c": 2})
    with pytest.raises(SplitError, match=r"class 'b' has no normal training images under /nowhere: add some"):
        build_split(catalog, "exp", 10)


def test_write_and_load_round_trip(tmp_path):
    manifest = build_split(memory_catalog({"a": 9, "b": 7, "c": 5}), "exp", 4)
    manifest.write(tmp_path / "m" / "split.csv")
    data = (tmp_path / "m" / "split.csv").read_bytes()
    assert data.startswith(b"class_name,image,group\n") and b"\r" not in data
    assert data.count(b"\n") == 1 + len(manifest.rows)
    meta = json.loads((tmp_path / "m" / "split.json").read_text())
    assert meta["csv_sha256"] == sha256_file(tmp_path / "m" / "split.csv")
    assert meta["counts"] == {"a": 9, "b": 4, "c": 2} and meta["recipe_version"] == RECIPE_VERSION
    assert meta["source_fingerprint"] == manifest.source_fingerprint
    for path in ("split.csv", "split.json"):
        assert load_manifest(tmp_path / "m" / path) == manifest
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["split.csv", "split.json"]  # no temp files


def test_tampered_manifests_are_refused(tmp_path):
    manifest = build_split(memory_catalog({"a": 9, "b": 7, "c": 5}), "exp", 4)
    manifest.write(tmp_path / "split.csv")
    csv_path, json_path = tmp_path / "split.csv", tmp_path / "split.json"
    csv_path.write_bytes(csv_path.read_bytes().replace(b"a/train/good/000.png", b"a/train/good/999.png"))
    with pytest.raises(SplitError, match=r"split.csv does not match the sha256 recorded in split.json"):
        load_manifest(csv_path)
    manifest.write(csv_path)
    meta = json.loads(json_path.read_text())
    meta["counts"]["a"] = 8
    json_path.write_text(json.dumps(meta))
    with pytest.raises(SplitError, match="rows do not add up to the counts in split.json"):
        load_manifest(csv_path)
    with pytest.raises(SplitError, match=r"manifest .*nothing.json does not exist"):
        load_manifest(tmp_path / "nothing.csv")
    with pytest.raises(SplitError, match="must end in .csv"):
        manifest.write(tmp_path / "split.txt")
    assert not (tmp_path / "split.txt").exists()


def test_unknown_split_names_list_the_pinned_ones():
    with pytest.raises(SplitError, match=r"split 'mvtec/exp300' is not pinned: pinned mvtec splits are mvtec/exp100, "
                                         r"mvtec/exp200, mvtec/step100, mvtec/step200"):
        load_manifest("mvtec/exp300")
    with pytest.raises(SplitError, match=r"unknown split 'cifar': use a pinned split \(mvtec/exp100, .*dagm/step200"):
        load_manifest("cifar")


def test_pinned_set_is_the_papers():
    expected = {f"mvtec/{p}{b}" for p in ("exp", "step") for b in (100, 200)}
    expected |= {f"visa/{p}{b}" for p in ("exp", "step") for b in (100, 200, 500)}
    expected |= {f"dagm/{p}{b}" for p in ("exp", "step") for b in (50, 100, 200, 500)}
    expected |= {"dagm/exp200-reverse", "dagm/step200-reverse"}
    expected |= {"synth/exp100", "synth/step100"}
    assert set(list_pinned()) == expected and len(list_pinned()) == len(expected)


@pytest.mark.parametrize("name", [n for n in list_pinned() if not n.startswith("synth/")])
def test_pinned_manifest_equals_a_rebuild_from_the_shipped_lists(name):
    pinned = load_manifest(name)
    rebuilt = rebuild_pinned(name)
    assert pinned == rebuilt
    assert (PINNED_DIR / f"{name}.json").read_text() == json.dumps(rebuilt.to_json(), indent=2) + "\n"
    profile, beta, reverse, _ = parse_config(name.split("/")[1])
    module = {"mvtec": mvtec, "visa": visa, "dagm": dagm}[pinned.dataset]
    order = list(reversed(module.CLASS_ORDER)) if reverse else list(module.CLASS_ORDER)
    targets = reference_counts(module.N_MAX, len(order), profile, beta)
    assert (pinned.profile, pinned.beta, pinned.reverse, pinned.seed) == (profile, beta, reverse, 0)
    assert pinned.class_order == order and pinned.target_counts == dict(zip(order, targets))
    assert pinned.high == order[:len(order) // 2] and pinned.low == order[len(order) // 2:]
    if pinned.dataset == "dagm":
        assert pinned.recipe_only and pinned.rows == [] and not (PINNED_DIR / f"{name}.csv").exists()
        return
    assert (PINNED_DIR / f"{name}.csv").read_bytes() == rebuilt.csv_bytes()
    shipped = module.catalog_from_file_list(Path("."))
    assert pinned.source_fingerprint == shipped.fingerprint()
    assert pinned.counts == {c: min(t, len(shipped.train_normals(c))) for c, t in zip(order, targets)}


@pytest.mark.parametrize("name", [n for n in list_pinned() if n.startswith("synth/")])
def test_pinned_synth_manifest_equals_a_rebuild_from_its_file_names(name, fast_path):
    from ltbench.datasets import synth

    catalog = synth.read_catalog(fakes.make_synth_names_tree(fast_path / "synth"))
    profile, beta, reverse, seed = parse_config(name.split("/")[1])
    rebuilt = build_split(catalog, profile, beta, reverse, seed)
    assert load_manifest(name) == rebuilt
    assert (PINNED_DIR / f"{name}.csv").read_bytes() == rebuilt.csv_bytes()
    targets = reference_counts(synth.N_MAX, len(synth.CLASS_ORDER), profile, beta)
    assert rebuilt.counts == dict(zip(synth.CLASS_ORDER, targets))  # every class has N_MAX images


def test_dagm_reverse_order_is_the_papers():
    from ltbench.datasets import paper_class_order

    assert load_manifest("dagm/exp200-reverse").class_order == list(paper_class_order("dagm_reverse"))


def test_open_split_on_the_mvtec_file_names(mvtec_names_tree):
    manifest, catalog = open_split("mvtec/exp100", mvtec_names_tree)
    assert manifest == load_manifest("mvtec/exp100") and catalog.root == mvtec_names_tree
    assert all(catalog.path(r.image).is_file() for r in manifest.rows)


def test_open_split_reports_missing_files(tmp_path, mvtec_tree):
    manifest = build_split(mvtec.read_catalog(mvtec_tree), "exp", 4)
    manifest.write(tmp_path / "mine.csv")
    for row in manifest.rows[:2]:
        (mvtec_tree / row.image).unlink()
    with pytest.raises(SplitError, match=rf"2 of {len(manifest.rows)} training images of split mvtec/exp4 are missing "
                                         rf"under {mvtec_tree}, e.g. {manifest.rows[0].image}, "
                                         rf"{manifest.rows[1].image}: point --root at the full dataset"):
        open_split(tmp_path / "mine.csv", mvtec_tree)


def test_converted_visa_builds_and_opens_the_pinned_split(visa_converted_names_tree):
    root = visa_converted_names_tree
    built = build_split(visa.read_catalog(root), "exp", 200)
    pinned = load_manifest("visa/exp200")
    assert built.csv_sha256 == pinned.csv_sha256  # manifests hold raw-layout paths
    opened, catalog = open_split("visa/exp200", root)
    assert opened.csv_sha256 == pinned.csv_sha256 and len(opened.rows) == len(pinned.rows)
    assert all("/train/good/" in r.image and catalog.path(r.image).is_file() for r in opened.rows)
    assert [visa.canonical_path(r.image) for r in opened.rows] == [r.image for r in pinned.rows]


def test_open_split_builds_dagm_from_the_pinned_recipe(dagm_tree):
    manifest, catalog = open_split("dagm/exp200-reverse", dagm_tree)
    pinned = load_manifest("dagm/exp200-reverse")
    assert manifest.class_order == pinned.class_order and manifest.target_counts == pinned.target_counts
    available = {c: len(catalog.train_normals(c)) for c in catalog.class_names}
    assert manifest.counts == {c: min(pinned.target_counts[c], available[c]) for c in pinned.class_order}
    assert manifest.source_fingerprint == catalog.fingerprint()
    assert all(catalog.path(r.image).is_file() for r in manifest.rows)
    with pytest.raises(SplitError, match="pins only the recipe: build its file list with ltbench make-split "
                                         "--dataset dagm --type exp --beta 200 --reverse --root DIR"):
        pinned.verify(dagm_tree)
    nested = fakes.make_dagm_tree(dagm_tree.parent / "nested", nested=True)
    assert open_split("dagm/step50", nested)[0].counts == open_split("dagm/step50", dagm_tree)[0].counts


def test_group_of_unknown_class():
    with pytest.raises(SplitError, match="class 'tyre' is not in split mvtec/exp100"):
        load_manifest("mvtec/exp100").group_of("tyre")
