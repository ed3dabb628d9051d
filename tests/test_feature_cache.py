"""Feature cache: hits, misses, invalidation, corruption, two writers at once, info/clear and the CLI."""

import multiprocessing
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in these tests may reach the network

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from ltbench import backbones
from ltbench.commands.cache import COMMANDS
from ltbench.feature_cache import FeatureCache, as_stored, default_root


@pytest.fixture(scope="module")
def encoder():
    return backbones.create("tiny-align").image


def images(count: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(count, 3, 224, 224, generator=torch.Generator().manual_seed(seed))


def entry_files(root):
    return sorted(root.rglob("*.safetensors"))


def assert_same(a, b):
    assert list(a.maps) == list(b.maps)
    for name in a.maps:
        assert torch.equal(a.maps[name], b.maps[name]), name
    assert torch.equal(a.embedding, b.embedding)


def test_miss_then_hit_gives_identical_float16_rounded_features(tmp_path, encoder):
    cache = FeatureCache(tmp_path)
    batch = images(3)
    first = cache.encode(encoder, batch)
    assert (cache.hits, cache.misses) == (0, 3)
    assert len(entry_files(tmp_path)) == 3
    second = cache.encode(encoder, batch)
    assert (cache.hits, cache.misses) == (3, 3)
    assert_same(first, second)
    direct = encoder.encode_image(batch)
    for name in direct.maps:
        assert first.maps[name].dtype == torch.float32
        assert torch.equal(first.maps[name], direct.maps[name].half().float())
    assert_same(as_stored(direct), first)
    # layout: <root>/<backbone>-<digest16>/<key[:2]>/<key>.safetensors
    key = cache.key(encoder, batch[0])
    path = cache.path(encoder, key)
    assert path == tmp_path / f"tiny-align-{encoder.digest[:16]}" / key[:2] / f"{key}.safetensors"
    stored = load_file(path)
    assert stored["map.block0"].dtype == torch.float16 and stored["map.block0"].shape == (8, 112, 112)


def test_mixed_batch_reads_hits_and_computes_only_misses(tmp_path, encoder):
    cache = FeatureCache(tmp_path, batch_size=2)
    batch = images(5)
    cache.encode(encoder, batch[[1, 3]])
    mixed = cache.encode(encoder, batch)
    assert (cache.hits, cache.misses) == (2, 5)
    assert_same(mixed, FeatureCache(tmp_path).encode(encoder, batch))


def test_any_change_of_the_key_is_a_miss(tmp_path, encoder):
    cache = FeatureCache(tmp_path)
    batch = images(1)
    cache.encode(encoder, batch)
    changed_pixel = batch.clone()
    changed_pixel[0, 1, 100, 100] += 1e-3
    cache.encode(encoder, changed_pixel)
    assert cache.misses == 2

    other_weights = backbones.create("tiny-align").image  # same name, one weight changed -> new digest
    with torch.no_grad():
        next(other_weights.module.parameters()).add_(1e-3)
    assert other_weights.digest != encoder.digest
    renamed = backbones.create("tiny-align").image
    renamed.name = "tiny-align-renamed"
    resized = backbones.create("tiny-align").image
    resized.input_size = 192
    for other in (other_weights, renamed, resized):
        cache.encode(other, batch)
    assert (cache.hits, cache.misses) == (0, 5)
    cache.encode(encoder, batch)
    assert cache.hits == 1
    assert len({cache.path(e, cache.key(e, batch[0])) for e in (encoder, other_weights, renamed, resized)}) == 4


def test_corrupt_entries_are_recomputed_not_trusted(tmp_path, encoder):
    cache = FeatureCache(tmp_path)
    batch = images(2)
    reference = cache.encode(encoder, batch)
    truncated, flipped = (cache.path(encoder, cache.key(encoder, image)) for image in batch)
    truncated.write_bytes(truncated.read_bytes()[:500])
    data = bytearray(flipped.read_bytes())
    data[-10] ^= 0xFF  # a flipped bit in the tensor data still parses: only the checksum catches it
    flipped.write_bytes(bytes(data))
    again = cache.encode(encoder, batch)
    assert (cache.corrupt, cache.misses) == (2, 4)
    assert_same(again, reference)
    assert_same(cache.encode(encoder, batch), reference)  # repaired on disk
    assert cache.corrupt == 2

    # a well-formed file stored under another image's key is not trusted either
    tensors = load_file(truncated)
    save_file(tensors, str(truncated), metadata={"key": "0" * 64, "checksum": "x"})
    cache.encode(encoder, batch[:1])
    assert cache.corrupt == 3


def _fill(root, seed, barriers, results, slot):
    torch.set_num_threads(1)
    encoder = backbones.create("tiny-align").image
    lookup, write = barriers

    class RacingCache(FeatureCache):
        """Holds each write until the other process is about to write the same entry."""

        def _write(self, *args):
            write.wait()
            return super()._write(*args)

    cache = RacingCache(root, batch_size=4, progress=False)
    lookup.wait()  # both look up the same empty cache; neither writes before both have computed
    features = cache.encode(encoder, images(4, seed))
    results[slot] = (cache.misses, features.embedding.tolist(), features.maps["block4"].sum().item())


def test_two_processes_filling_the_cache_at_once(tmp_path):
    context = multiprocessing.get_context("fork")
    barriers = (context.Barrier(2), context.Barrier(2))
    with context.Manager() as manager:
        results = manager.dict()
        workers = [context.Process(target=_fill, args=(tmp_path, 7, barriers, results, slot)) for slot in (0, 1)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=120)
        assert [w.exitcode for w in workers] == [0, 0]
        first, second = results[0], results[1]
    assert first[0] == second[0] == 4  # both computed and wrote every entry
    assert first[1:] == second[1:]
    files = entry_files(tmp_path)
    assert len(files) == 4 and not list(tmp_path.rglob("*.tmp"))
    cache = FeatureCache(tmp_path)
    stored = cache.encode(backbones.create("tiny-align").image, images(4, 7))
    assert (cache.hits, cache.corrupt) == (4, 0)
    assert stored.embedding.tolist() == first[1]


def test_encode_batches_streams_batches(tmp_path, encoder):
    cache = FeatureCache(tmp_path, progress=False)
    batch = images(5)
    parts = list(cache.encode_batches(encoder, (batch[i:i + 2] for i in range(0, 5, 2)), total=5))
    assert [p.embedding.shape[0] for p in parts] == [2, 2, 1]
    assert_same(backbones.Features.cat(parts), cache.encode(encoder, batch))
    assert cache.hits == 5


def test_info_and_clear(tmp_path, encoder):
    cache = FeatureCache(tmp_path)
    assert cache.info()["entries"] == 0 and cache.clear() == 0
    cache.encode(encoder, images(3))
    info = cache.info()
    folder = f"tiny-align-{encoder.digest[:16]}"
    assert info["entries"] == 3 and list(info["backbones"]) == [folder]
    assert info["backbones"][folder]["name"] == "tiny-align"
    assert info["bytes"] == sum(p.stat().st_size for p in entry_files(tmp_path)) > 0
    (tmp_path / "notes.txt").write_text("not ours")
    assert cache.clear("lite") == 0 and cache.info()["entries"] == 3
    assert cache.clear("tiny-align") == 3
    assert cache.info()["entries"] == 0 and not entry_files(tmp_path)
    assert (tmp_path / "notes.txt").exists() and not (tmp_path / folder).exists()


def test_default_root_follows_ltbench_home(tmp_path, monkeypatch):
    monkeypatch.setenv("LTBENCH_HOME", str(tmp_path / "home"))
    assert default_root() == tmp_path / "home" / "features"
    assert FeatureCache().root == tmp_path / "home" / "features"


def test_cli_info_and_clear(tmp_path, encoder):
    FeatureCache(tmp_path).encode(encoder, images(2))
    (command,) = COMMANDS
    runner = CliRunner()
    shown = runner.invoke(command, ["info", "--root", str(tmp_path)])
    assert shown.exit_code == 0, shown.output
    assert f"tiny-align-{encoder.digest[:16]}" in shown.output and "total" in shown.output
    assert shown.output.splitlines()[-1].split()[:2] == ["total", "2"]
    refused = runner.invoke(command, ["clear", "--root", str(tmp_path)], input="n\n")
    assert refused.exit_code == 1 and len(entry_files(tmp_path)) == 2
    cleared = runner.invoke(command, ["clear", "--root", str(tmp_path), "--yes"])
    assert cleared.exit_code == 0 and "Deleted 2 cached feature files" in cleared.output
    assert "empty" in runner.invoke(command, ["info", "--root", str(tmp_path)]).output
