"""`ltbench download`: fetched from a local HTTP server, verified, resumed, safely extracted."""

from __future__ import annotations

import csv
import hashlib
import io
import re
import socket
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import fakes
import pytest
from click.testing import CliRunner

from ltbench import download
from ltbench.cli import main
from ltbench.datasets import DATA_FILES
from ltbench.download import DOWNLOADS_DIR, download_dataset, extract_archive, parse_checksums
from ltbench.errors import DatasetError, DownloadError

VISA_ARCHIVE = "VisA_20220922.tar"


class ArchiveServer:
    """A 127.0.0.1 HTTP server with Range support that can cut a connection or ignore Range."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}          # URL path -> body
        self.cut_first_after: dict[str, int] = {}  # URL path -> bytes sent before the first response drops
        self.honour_range = True
        self.requests: list[tuple[str, str | None]] = []   # (path, Range header) per request
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:   # keep pytest output clean
                pass

            def do_GET(self) -> None:
                path = self.path.split("?")[0]
                server.requests.append((path, self.headers.get("Range")))
                body = server.files.get(path)
                if body is None:
                    self.send_error(404)
                    return
                start = 0
                match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
                if match and server.honour_range:
                    start = int(match.group(1))
                    if start >= len(body):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(body)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                cut = server.cut_first_after.pop(path, None)
                if cut is not None:
                    self.wfile.write(body[start:start + cut])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)   # the client sees a short body
                    self.close_connection = True
                    return
                self.wfile.write(body[start:])

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02},
                                       daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"


@pytest.fixture
def server():
    archive_server = ArchiveServer()
    archive_server.thread.start()
    yield archive_server
    archive_server.httpd.shutdown()
    archive_server.httpd.server_close()


def make_tar(members: list[tuple], compression: str = "") -> bytes:
    """A tar archive in memory; members are ("file", name, bytes), ("dir", name), ("symlink", name, target),
    ("hardlink", name, target) or ("fifo", name)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=f"w:{compression}") as tar:
        for kind, name, *rest in members:
            info = tarfile.TarInfo(name)
            if kind == "file":
                info.size = len(rest[0])
                tar.addfile(info, io.BytesIO(rest[0]))
                continue
            info.type = {"dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE,
                         "fifo": tarfile.FIFOTYPE}[kind]
            if rest:
                info.linkname = rest[0]
            tar.addfile(info)
    return buffer.getvalue()


def make_zip(members: list[tuple]) -> bytes:
    """A zip archive in memory; members are ("file", name, bytes) or ("symlink", name, target)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for kind, name, data in members:
            info = zipfile.ZipInfo(name)
            if kind == "symlink":
                info.external_attr = 0o120777 << 16
                data = data.encode()
            zf.writestr(info, data)
    return buffer.getvalue()


# Big enough that a cut after 20,000 bytes is really half-way through.
PAYLOAD = bytes(range(256)) * 300
GOOD_TAR = make_tar([("dir", "candle"), ("file", "candle/Data/Images/Normal/0000.JPG", PAYLOAD),
                     ("file", "split_csv/1cls.csv", b"object,split,label,image,mask\r\n"),
                     ("symlink", "candle/latest.JPG", "Data/Images/Normal/0000.JPG")])
GOOD_SHA = hashlib.sha256(GOOD_TAR).hexdigest()


def fetch_visa(server: ArchiveServer, root: Path, body: bytes = GOOD_TAR, sha: str = GOOD_SHA, **kwargs):
    server.files["/" + VISA_ARCHIVE] = body
    return download_dataset("visa", root, url=server.url("/" + VISA_ARCHIVE), checksums={VISA_ARCHIVE: sha},
                            verify_files=False, progress=False, **kwargs)


def assert_good_tree(root: Path) -> None:
    assert (root / "candle/Data/Images/Normal/0000.JPG").read_bytes() == PAYLOAD
    assert (root / "split_csv/1cls.csv").read_bytes().startswith(b"object,split")
    assert (root / "candle/latest.JPG").is_symlink()
    assert (root / "candle/latest.JPG").read_bytes() == PAYLOAD


def test_good_archive_downloads_verifies_and_extracts(server, tmp_path):
    root = tmp_path / "visa"
    report = fetch_visa(server, root)
    assert_good_tree(root)
    [archive] = report.archives
    assert (archive.sha256, archive.pinned, archive.files) == (GOOD_SHA, True, 2)   # the link is not a file
    # the archive is removed after extraction; only the marker is left, and nothing half-done
    assert sorted(p.name for p in (root / DOWNLOADS_DIR).iterdir()) == [f"{VISA_ARCHIVE}.extracted.json"]
    # a second run finds the marker and fetches nothing
    requests = len(server.requests)
    again = fetch_visa(server, root)
    assert len(server.requests) == requests and again.archives[0].files is None


def test_wrong_checksum_extracts_nothing_and_deletes_the_file(server, tmp_path):
    root = tmp_path / "visa"
    with pytest.raises(DownloadError) as error:
        fetch_visa(server, root, sha="0" * 64)
    message = str(error.value)
    assert "nothing was extracted" in message and "deleted" in message and GOOD_SHA in message
    assert [p.name for p in root.iterdir()] == [DOWNLOADS_DIR]
    assert list((root / DOWNLOADS_DIR).iterdir()) == []


def test_cut_connection_resumes_with_range(server, tmp_path):
    server.cut_first_after["/" + VISA_ARCHIVE] = 20_000
    fetch_visa(server, tmp_path / "visa", retries=2, backoff=0.0)
    assert_good_tree(tmp_path / "visa")
    assert [r for _, r in server.requests] == [None, "bytes=20000-"]


def test_interrupted_run_keeps_the_part_file_and_the_next_run_resumes(server, tmp_path):
    root = tmp_path / "visa"
    server.cut_first_after["/" + VISA_ARCHIVE] = 20_000
    with pytest.raises(DownloadError, match="run the same command again to resume"):
        fetch_visa(server, root, retries=0)
    part = root / DOWNLOADS_DIR / f"{VISA_ARCHIVE}.part"
    assert part.read_bytes() == GOOD_TAR[:20_000]
    assert not (root / "candle").exists()
    fetch_visa(server, root, retries=0)
    assert server.requests[-1][1] == "bytes=20000-"
    assert_good_tree(root)
    assert not part.exists()


def test_complete_part_file_is_verified_without_downloading_again(server, tmp_path):
    # interrupted after the last byte arrived, before the rename: the server answers 416 to the resume
    part = tmp_path / "visa" / DOWNLOADS_DIR / f"{VISA_ARCHIVE}.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(GOOD_TAR)
    fetch_visa(server, tmp_path / "visa", retries=0)
    assert server.requests == [("/" + VISA_ARCHIVE, f"bytes={len(GOOD_TAR)}-")]
    assert_good_tree(tmp_path / "visa")


def test_server_ignoring_range_restarts_the_file(server, tmp_path):
    server.cut_first_after["/" + VISA_ARCHIVE] = 20_000
    server.honour_range = False
    fetch_visa(server, tmp_path / "visa", retries=1, backoff=0.0)
    assert_good_tree(tmp_path / "visa")


def test_http_error_names_the_status(server, tmp_path):
    with pytest.raises(DownloadError, match="HTTP 404"):
        download_dataset("visa", tmp_path, url=server.url("/moved.tar"), progress=False, verify_files=False)


def test_local_mirror_file_is_verified_and_kept(tmp_path):
    mirror = tmp_path / "mirror.tar"
    mirror.write_bytes(GOOD_TAR)
    download_dataset("visa", tmp_path / "visa", url=mirror.as_uri(), checksums={VISA_ARCHIVE: GOOD_SHA},
                     progress=False, verify_files=False)
    assert_good_tree(tmp_path / "visa")
    assert mirror.read_bytes() == GOOD_TAR

    with pytest.raises(DownloadError, match="nothing was extracted and .*mirror.tar was left as it is"):
        download_dataset("visa", tmp_path / "other", url=str(mirror), checksums={VISA_ARCHIVE: "f" * 64},
                         progress=False, verify_files=False)
    assert mirror.read_bytes() == GOOD_TAR and not (tmp_path / "other" / "candle").exists()


UNSAFE_ARCHIVES = {
    "dotdot": ("tar", [("file", "ok.txt", b"x"), ("file", "../evil.txt", b"evil")]),
    "absolute": ("tar", [("file", "ok.txt", b"x"), ("file", "/tmp/ltbench-evil.txt", b"evil")]),
    "link-outside": ("tar", [("symlink", "escape", "../../evil.txt")]),
    "link-absolute": ("tar", [("symlink", "escape", "/etc/passwd")]),
    "write-through-link": ("tar", [("symlink", "here", "."), ("file", "here/x.txt", b"x")]),
    # each hop looks inside on its own; the chain resolves above the root
    "link-chain": ("tar", [("symlink", "a", "."), ("symlink", "b", "a/a/a/..")]),
    "hardlink-outside": ("tar", [("hardlink", "copy", "../../etc/passwd")]),
    "fifo": ("tar", [("fifo", "pipe")]),
    "zip-dotdot": ("zip", [("file", "ok.txt", b"x"), ("file", "a/../../evil.txt", b"evil")]),
    "zip-backslash": ("zip", [("file", "..\\evil.txt", b"evil")]),
    "zip-absolute": ("zip", [("file", "/evil.txt", b"evil")]),
    "zip-link-outside": ("zip", [("symlink", "escape", "../evil.txt")]),
}


@pytest.mark.parametrize("case", sorted(UNSAFE_ARCHIVES))
def test_unsafe_archive_is_refused_and_nothing_is_extracted(tmp_path, case):
    kind, members = UNSAFE_ARCHIVES[case]
    archive = tmp_path / f"unsafe.{kind}"
    archive.write_bytes(make_tar(members) if kind == "tar" else make_zip(members))
    root = tmp_path / "data" / "root"
    with pytest.raises(DownloadError, match="is unsafe: member .*nothing was extracted"):
        extract_archive(archive, root, progress=False)
    assert [p.name for p in root.iterdir()] == [DOWNLOADS_DIR]
    assert list((root / DOWNLOADS_DIR).iterdir()) == []        # staging removed
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["root"]
    assert not (tmp_path / "evil.txt").exists() and not Path("/tmp/ltbench-evil.txt").exists()


def test_safe_links_and_hardlinks_inside_the_root_extract(tmp_path):
    archive = tmp_path / "safe.tar.gz"
    archive.write_bytes(make_tar([("file", "top/a.txt", b"A"), ("symlink", "top/sub/link", "../a.txt"),
                                  ("hardlink", "top/b.txt", "top/a.txt")], compression="gz"))
    assert extract_archive(archive, tmp_path / "root", progress=False) == 2
    assert (tmp_path / "root/top/sub/link").read_bytes() == b"A"
    assert (tmp_path / "root/top/b.txt").read_bytes() == b"A"
    assert not (tmp_path / "root/top/b.txt").is_symlink()


def test_dagm_checksums_are_not_pinned_reported_and_its_labels_checked(server, tmp_path):
    source = fakes.make_dagm_tree(tmp_path / "source")
    bodies = {}
    for class_dir in sorted(source.iterdir()):   # one zip per class, as on Zenodo
        members = [("file", path.relative_to(source).as_posix(), path.read_bytes())
                   for path in sorted(class_dir.rglob("*")) if path.is_file()]
        bodies[f"{class_dir.name}.zip"] = make_zip(members)
        server.files[f"/mirror/{class_dir.name}.zip"] = bodies[f"{class_dir.name}.zip"]
    root = tmp_path / "dagm"
    report = download_dataset("dagm", root, url=server.url("/mirror/"), progress=False)
    assert len(report.unpinned) == 10
    for archive in report.archives:
        body = bodies[archive.filename]
        assert archive.sha256 == hashlib.sha256(body).hexdigest()
        assert archive.md5 == hashlib.md5(body).hexdigest()
    # every image and mask named by the Labels.txt files was found
    expected = {p.relative_to(source).as_posix() for p in source.rglob("*.PNG")}
    assert report.files_checked == len(expected) and report.unexpected_files == 0
    assert {p.relative_to(root).as_posix() for p in root.rglob("*.PNG")} == expected

    result = CliRunner().invoke(main, ["download", "dagm", "--root", str(tmp_path / "dagm-cli"),
                                       "--url", server.url("/mirror/")])
    assert result.exit_code == 0, result.output
    assert "No checksum is pinned for the dagm archives" in result.output
    sha1 = hashlib.sha256(bodies["Class1.zip"]).hexdigest()
    assert f"--sha256 Class1.zip={sha1}" in result.output


def test_parse_checksums():
    digest = "a" * 64
    assert parse_checksums("visa", [digest.upper()]) == {VISA_ARCHIVE: digest}
    assert parse_checksums("dagm", [f"Class3.zip={digest}"]) == {"Class3.zip": digest}
    with pytest.raises(DownloadError, match="FILE=HEX"):
        parse_checksums("dagm", [digest])
    with pytest.raises(DownloadError, match="64 hexadecimal"):
        parse_checksums("visa", ["abc"])
    with pytest.raises(DownloadError, match="Class11.zip"):
        download.archive_sources("dagm", checksums={"Class11.zip": digest})


def test_mvtec_download_checks_the_shipped_file_list(server, tmp_path):
    with open(DATA_FILES / "mvtec_files.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    names = sorted({r["image"] for r in rows} | {r["mask"] for r in rows if r["mask"]})
    # every file of the list with placeholder bytes; gzip, not xz, to keep the test fast (the
    # compression is detected from the content, whatever the name says)
    body = make_tar([("file", name, b"p") for name in names], compression="gz")
    archive = "mvtec_anomaly_detection.tar.xz"
    server.files["/" + archive] = body
    root = tmp_path / "mvtec"

    def fetch_mvtec():
        return download_dataset("mvtec", root, url=server.url("/" + archive),
                                checksums={archive: hashlib.sha256(body).hexdigest()}, progress=False)

    report = fetch_mvtec()
    assert (report.files_checked, report.unexpected_files) == (len(names), 0) == (5354 + 1258, 0)
    # the check runs on every call, also when the archive was extracted before
    (root / names[0]).unlink()
    with pytest.raises(DatasetError, match=f"1 of the {len(names)} expected files are missing .first: {names[0]}"):
        fetch_mvtec()


def test_cli_prints_the_licence_first_and_reports_errors(server, tmp_path):
    server.files["/" + VISA_ARCHIVE] = GOOD_TAR
    runner = CliRunner()
    args = ["download", "visa", "--root", str(tmp_path / "visa"), "--url", server.url("/" + VISA_ARCHIVE),
            "--no-verify-files"]
    result = runner.invoke(main, [*args, "--sha256", GOOD_SHA])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("VisA (Amazon) is distributed under CC BY 4.0")
    assert f"sha256 {GOOD_SHA} verified" in result.output
    result = runner.invoke(main, [*args[:3], str(tmp_path / "other"), *args[4:], "--sha256", "1" * 64])
    assert result.exit_code == 1
    assert "Error: " in result.output and "nothing was extracted" in result.output
