"""The pinned sha256 of a dataset archive is what verification uses when the caller passes none.

Every other download test passes its own checksum; here no checksum is given, so only the pinned
default can accept or refuse the archive. The archive is served from a local file (`--url PATH`),
the path a mirror takes.
"""

from __future__ import annotations

import functools
import hashlib
import tarfile
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from click.testing import CliRunner

from ltbench import download
from ltbench.cli import main
from ltbench.download import DOWNLOADS_DIR, archive_sources, download_dataset
from ltbench.errors import DownloadError

# The published checksums (shared/notes/datasets.md, checked against the archives' sources).
MVTEC_SHA256 = "cf4313b13603bec67abb49ca959488f7eedce2a9f7795ec54446c649ac98cd3d"
VISA_SHA256 = "2eb8690c803ab37de0324772964100169ec8ba1fa3f7e94291c9ca673f40f362"
VISA_ARCHIVE = "VisA_20220922.tar"


def test_the_pinned_defaults_are_the_published_checksums():
    assert [(s.filename, s.sha256) for s in archive_sources("mvtec")] == [
        ("mvtec_anomaly_detection.tar.xz", MVTEC_SHA256)]
    assert [(s.filename, s.sha256) for s in archive_sources("visa")] == [(VISA_ARCHIVE, VISA_SHA256)]
    # a mirror changes where the archive comes from, never the checksum it must have
    assert archive_sources("visa", url="/mirror/visa.tar")[0].sha256 == VISA_SHA256


def small_archive(folder: Path) -> Path:
    """A tar with one file, named as the VisA archive."""
    content = folder / "content.txt"
    content.write_bytes(b"candle\n")
    archive = folder / VISA_ARCHIVE
    with tarfile.open(archive, "w") as tar:
        tar.add(content, arcname="candle/readme.txt")
    return archive


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep pytest output clean
        pass


def pin(monkeypatch: pytest.MonkeyPatch, sha256: str) -> None:
    """Make `sha256` VisA's pinned default (in place of the real one, which no small test archive can match)."""
    import dataclasses

    from ltbench.datasets import visa

    [source] = visa.INFO.sources
    pinned = dataclasses.replace(visa.INFO, sources=(download.ArchiveSource(source.filename, source.url, sha256),))
    monkeypatch.setattr(visa, "INFO", pinned)


def test_without_a_checksum_the_pinned_one_accepts_a_matching_archive(tmp_path, monkeypatch):
    archive = small_archive(tmp_path)
    pin(monkeypatch, hashlib.sha256(archive.read_bytes()).hexdigest())
    root = tmp_path / "visa"
    report = download_dataset("visa", root, url=str(archive), verify_files=False, progress=False)
    [result] = report.archives
    assert result.pinned and result.sha256 == hashlib.sha256(archive.read_bytes()).hexdigest()
    assert (root / "candle" / "readme.txt").read_bytes() == b"candle\n"


def test_without_a_checksum_the_real_pin_refuses_another_archive_and_extracts_nothing(tmp_path):
    archive = small_archive(tmp_path)
    root = tmp_path / "visa"
    with pytest.raises(DownloadError) as error:
        download_dataset("visa", root, url=str(archive), verify_files=False, progress=False)
    assert f"expected {VISA_SHA256}" in str(error.value) and "nothing was extracted" in str(error.value)
    assert not (root / "candle").exists()
    assert archive.is_file()  # the user's own copy is never deleted


def test_keep_archives_keeps_the_verified_archive_and_without_it_it_is_removed(tmp_path, monkeypatch):
    body = small_archive(tmp_path).read_bytes()
    pin(monkeypatch, hashlib.sha256(body).hexdigest())
    served = tmp_path / "served"  # fetched over HTTP, so the archive lands in .downloads as a real download does
    served.mkdir()
    (served / VISA_ARCHIVE).write_bytes(body)
    handler = functools.partial(QuietHandler, directory=str(served))
    with ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        url = f"http://127.0.0.1:{server.server_address[1]}/{VISA_ARCHIVE}"
        try:
            outcomes = [(flags, kept, CliRunner().invoke(main, ["download", "visa", "--root", str(tmp_path / f"visa{kept}"),
                                                                "--url", url, "--no-verify-files", *flags]))
                        for flags, kept in (([], False), (["--keep-archives"], True))]
        finally:
            server.shutdown()
    for flags, kept, result in outcomes:
        root = tmp_path / f"visa{kept}"
        assert result.exit_code == 0, result.output
        assert f"{VISA_ARCHIVE}: sha256 {hashlib.sha256(body).hexdigest()} verified" in result.output
        assert (root / "candle" / "readme.txt").read_bytes() == b"candle\n"
        archive = root / DOWNLOADS_DIR / VISA_ARCHIVE
        assert archive.is_file() == kept, (flags, sorted(p.name for p in (root / DOWNLOADS_DIR).iterdir()))
        if kept:
            assert archive.read_bytes() == body
