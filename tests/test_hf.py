"""🤗 datasets integration: `load_split`, the parquet export and its card, pushing, the manifest CSVs."""

from __future__ import annotations

import glob
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import datasets
import fakes
import huggingface_hub.constants
import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from PIL import Image

from ltbench import hf
from ltbench.cli import main
from ltbench.datasets import open_catalog, visa
from ltbench.splits import PINNED_DIR, build_split, load_manifest

# VisA masks store defect-type ids; this one has two defects (ids 1 and 2) on an 8x8 background.
MASK_IDS = np.zeros((8, 8), dtype=np.uint8)
MASK_IDS[0:2, 0:3] = 1
MASK_IDS[5:8, 4:8] = 2
ID_MASK_IMAGE = "pcb1/Data/Images/Anomaly/000.JPG"


@pytest.fixture(autouse=True)
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """`datasets` and the Hub client use temporary folders; no login token is visible."""
    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "hf-home" / "token"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "hf-home" / "tokens"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("LTBENCH_DATA", raising=False)
    return cache


@pytest.fixture
def visa_split(tmp_path: Path) -> tuple[Path, Path]:
    """A small raw VisA tree (uneven class sizes, one id-valued mask) and an exp500 manifest built on it."""
    counts = {c: 4 - (i % 3) for i, c in enumerate(visa.CLASS_ORDER)}
    root = fakes.make_visa_tree(tmp_path / "visa", counts=counts, test_normal=1, anomalies=1)
    Image.fromarray(MASK_IDS, mode="L").save(root / "pcb1/Data/Masks/Anomaly/000.png")
    manifest_csv = tmp_path / "manifests" / "exp500.csv"
    build_split(open_catalog("visa", root), "exp", 500).write(manifest_csv)
    return root, manifest_csv


def test_load_split_rows_and_features(visa_split):
    root, manifest_csv = visa_split
    manifest = load_manifest(manifest_csv)
    splits = hf.load_split(manifest_csv, root)

    assert set(splits) == {"train", "test"}
    assert splits["train"].features == hf.split_features(manifest)
    features = splits["train"].features
    assert isinstance(features["image"], datasets.Image) and isinstance(features["mask"], datasets.Image)
    assert features["label"].names == ["normal", "anomaly"]
    assert features["class_name"].names == manifest.class_order
    assert features["group"].names == ["high", "low"]
    assert features["defect_type"].dtype == features["path"].dtype == "string"

    train = splits["train"].select_columns(["path", "class_name", "group", "label", "defect_type"]).to_list()
    assert [r["path"] for r in train] == [row.image for row in manifest.rows]
    assert [manifest.class_order[r["class_name"]] for r in train] == [row.class_name for row in manifest.rows]
    assert [("high", "low")[r["group"]] for r in train] == [row.group for row in manifest.rows]
    assert {(r["label"], r["defect_type"]) for r in train} == {(0, "good")}
    assert splits["train"]["mask"] == [None] * len(manifest.rows)

    # every class: 1 normal + 1 anomalous test image, in the split's class order
    test = splits["test"].select_columns(["path", "class_name", "label", "defect_type"]).to_list()
    assert len(test) == 2 * len(manifest.class_order)
    assert [r["class_name"] for r in test] == sorted(r["class_name"] for r in test)
    assert sum(r["label"] for r in test) == len(manifest.class_order)
    assert {r["defect_type"] for r in test if r["label"] == 1} == {"bad"}


def test_images_and_masks_decode_to_the_right_pixels(visa_split):
    root, manifest_csv = visa_split
    test = hf.load_split(manifest_csv, root)["test"]
    index = test["path"].index(ID_MASK_IMAGE)
    example = test[index]
    mask = np.asarray(example["mask"])
    assert example["mask"].mode == "L" and mask.shape == (8, 8)
    assert np.array_equal(mask, np.where(MASK_IDS > 0, 255, 0))     # ids 1 and 2 both become 255
    with Image.open(root / ID_MASK_IMAGE) as source:
        assert np.array_equal(np.asarray(example["image"]), np.asarray(source))
    normal = test[test["label"].index(0)]
    assert normal["mask"] is None


def test_load_split_is_cached_per_root(visa_split, tmp_path):
    root, manifest_csv = visa_split
    first = hf.load_split(manifest_csv, root)["train"]
    again = hf.load_split(manifest_csv, root)["train"]
    assert [f["filename"] for f in again.cache_files] == [f["filename"] for f in first.cache_files]

    other_root = shutil.copytree(root, tmp_path / "visa-copy")
    other = hf.load_split(manifest_csv, other_root)["train"]
    assert [f["filename"] for f in other.cache_files] != [f["filename"] for f in first.cache_files]
    image_paths = other.cast_column("image", datasets.Image(decode=False))["image"]
    assert all(Path(i["path"]).is_relative_to(other_root.resolve()) for i in image_paths)


def read_export(out: Path, cache_dir: Path) -> datasets.DatasetDict:
    files = {split: sorted(glob.glob(str(out / "data" / f"{split}-*.parquet"))) for split in ("train", "test")}
    return datasets.load_dataset("parquet", data_files=files, cache_dir=str(cache_dir))


def test_export_round_trip_gives_identical_rows_and_bytes(visa_split, tmp_path, hf_cache):
    root, manifest_csv = visa_split
    manifest = load_manifest(manifest_csv)
    out = tmp_path / "export"
    result = hf.export_split(manifest_csv, out, root, max_shard_bytes=2_000)
    assert len(result.shards["train"]) > 1 and len(result.shards["test"]) > 1   # tiny limit: several shards

    original = hf.load_split(manifest_csv, root)
    reloaded = read_export(out, tmp_path / "reload-cache")
    for split in ("train", "test"):
        assert reloaded[split].features == original[split].features
        columns = ["label", "class_name", "group", "defect_type", "path"]
        assert reloaded[split].select_columns(columns).to_list() == original[split].select_columns(columns).to_list()
        raw = reloaded[split].cast_column("image", datasets.Image(decode=False)).cast_column(
            "mask", datasets.Image(decode=False))
        for row in raw:
            assert row["image"]["bytes"] == (root / row["path"]).read_bytes()
            assert "/" not in row["image"]["path"]           # no local folder names leak into the export
        masks = [row["mask"]["bytes"] for row in raw if row["mask"] is not None]
        expected = [hf.binary_mask_png(root / r.mask) for r in sorted(
            (r for r in open_catalog("visa", root).records if r.split == split and r.mask),
            key=lambda r: (manifest.class_order.index(r.class_name), r.image))]
        assert masks == expected

    # the card's YAML (configs + features) is what `load_dataset(<folder>)` and the Hub read
    by_card = datasets.load_dataset(str(out), cache_dir=str(tmp_path / "card-cache"))
    assert {s: len(d) for s, d in by_card.items()} == {"train": len(manifest.rows), "test": 24}
    assert by_card["train"].features == original["train"].features
    card = (out / "README.md").read_text()
    metadata = yaml.safe_load(card.split("---\n")[1])
    assert metadata["license"] == "cc-by-4.0"
    assert metadata["ltbench"]["manifest_sha256"] == manifest.csv_sha256
    assert metadata["ltbench"]["beta"] == 500 and metadata["ltbench"]["seed"] == 0
    assert "Zou, Yang" in card and "CC BY 4.0" in card
    assert load_manifest(out / "manifest" / "exp500.csv").csv_sha256 == manifest.csv_sha256


def test_export_replaces_the_shards_of_an_earlier_export(visa_split, tmp_path):
    root, manifest_csv = visa_split
    out = tmp_path / "export"
    hf.export_split(manifest_csv, out, root, max_shard_bytes=2_000)
    hf.export_split(manifest_csv, out, root)
    assert sorted(p.name for p in (out / "data").iterdir()) == ["test-00000-of-00001.parquet",
                                                                "train-00000-of-00001.parquet"]


def test_pinned_manifest_csv_loads_with_datasets(tmp_path):
    csv_path = PINNED_DIR / "mvtec" / "exp100.csv"
    loaded = datasets.load_dataset("csv", data_files=str(csv_path), cache_dir=str(tmp_path / "csv-cache"))
    manifest = load_manifest("mvtec/exp100")
    assert loaded["train"].to_list() == [
        {"class_name": r.class_name, "image": r.image, "group": r.group} for r in manifest.rows]


def test_cli_export_then_push_without_token_fails_cleanly(visa_split, tmp_path, monkeypatch):
    root, manifest_csv = visa_split
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    out = tmp_path / "export"
    result = CliRunner().invoke(main, ["export-hf", "--split", str(manifest_csv), "--root", str(root),
                                       "--out", str(out), "--push-to-hub", "someone/visa-exp500"])
    assert result.exit_code == 1
    assert "Error: no Hugging Face token" in result.output
    assert (out / "README.md").is_file()            # the export happened before the push was tried
    assert 'load_dataset("someone/visa-exp500")' in (out / "README.md").read_text()


class RefusingHub:
    """A stand-in Hub endpoint on 127.0.0.1 that answers 401 and records the Authorization headers."""

    def __init__(self) -> None:
        self.authorizations: list[str | None] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def refuse(self) -> None:
                hub.authorizations.append(self.headers.get("Authorization"))
                body = b'{"error": "Invalid credentials in Authorization header"}'
                self.send_response(401)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PUT = refuse

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()


def test_push_uses_the_environment_token_and_never_shows_or_stores_it(visa_split, tmp_path, monkeypatch):
    root, manifest_csv = visa_split
    token = "hf_ltbenchTestTokenThatMustNotLeak"
    hub = RefusingHub()
    try:
        monkeypatch.setenv("HF_TOKEN", token)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{hub.httpd.server_address[1]}")
        out = tmp_path / "export"
        result = CliRunner().invoke(main, ["export-hf", "--split", str(manifest_csv), "--root", str(root),
                                           "--out", str(out), "--push-to-hub", "someone/visa", "--private"])
    finally:
        hub.httpd.shutdown()
        hub.httpd.server_close()
    assert result.exit_code == 1, result.output
    assert "Error: pushing" in result.output and "someone/visa" in result.output
    assert "the token was refused" in result.output
    assert f"Bearer {token}" in hub.authorizations        # the token was taken from HF_TOKEN and sent
    assert token not in result.output
    assert not [p for p in out.rglob("*") if p.is_file() and token.encode() in p.read_bytes()]


def test_push_in_offline_mode_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_TOKEN", "hf_unused")
    with pytest.raises(hf.HubError, match="HF_HUB_OFFLINE is set"):
        hf.push_to_hub(tmp_path, "someone/visa")
