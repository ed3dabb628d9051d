"""Fetch the public datasets: pinned URLs and checksums, resumable, verified, safely extracted.

`download_dataset("mvtec", root)` downloads each archive of a dataset into
`<root>/.downloads/<file>.part` (resuming with an HTTP Range request after a cut connection or
an interrupted run), checks its sha256 *before* anything is extracted, extracts it member by
member into a staging folder (refusing absolute paths, `..`, links that leave the root, and
device files), moves the result into the root, and finally checks the root against the dataset's file list.

The library never prints: progress goes through tqdm (stderr) and the CLI prints the licence
line (`dataset_info(dataset).licence_line()`) before calling it.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import posixpath
import re
import shutil
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from tqdm.auto import tqdm

from ltbench import __version__
from ltbench.datasets import DATASETS, dataset_info
from ltbench.datasets.base import ArchiveSource
from ltbench.errors import DatasetError, DownloadError
from ltbench.io import write_json

DOWNLOADS_DIR = ".downloads"   # under the dataset root: archives, .part files, staging, markers
CHUNK_SIZE = 1 << 20           # bytes read per network / disk step


# --------------------------------------------------------------------------- sources


def downloadable_datasets() -> tuple[str, ...]:
    """The datasets whose description (`DatasetInfo.sources`) names archives to fetch."""
    return tuple(name for name in DATASETS if dataset_info(name).sources)


def archive_sources(dataset: str, url: str | None = None,
                    checksums: Mapping[str, str] | None = None) -> list[ArchiveSource]:
    """The archives to fetch for a dataset, after a mirror `url` and user checksums are applied.

    Parameters: dataset: one of `downloadable_datasets()`. url: a mirror; for a one-archive dataset the archive's
        URL (http(s), file:// or a local path), for a several-archive dataset (DAGM) a base URL or
        folder to which each file name is appended. checksums: file name -> sha256 hex, overriding
        or adding to the pinned ones.
    Returns: one `ArchiveSource` per archive, in download order.
    """
    known = downloadable_datasets()
    if dataset not in known:
        raise DownloadError(f"no download is known for dataset {dataset!r}; known: {', '.join(known)}")
    sources = list(dataset_info(dataset).sources)
    checksums = dict(checksums or {})
    unknown = sorted(set(checksums) - {s.filename for s in sources})
    if unknown:
        raise DownloadError(f"--sha256 names {', '.join(unknown)}, which {dataset} does not have; its archives "
                            f"are {', '.join(s.filename for s in sources)}")
    result = []
    for source in sources:
        if url is None:
            source_url = source.url
        elif len(sources) == 1:
            source_url = url
        else:
            source_url = url.rstrip("/") + "/" + source.filename
        result.append(ArchiveSource(source.filename, source_url, checksums.get(source.filename, source.sha256)))
    return result


def parse_checksums(dataset: str, values: Iterable[str]) -> dict[str, str]:
    """Turn `--sha256` values into file name -> hex: `HEX` (one-archive datasets) or `FILE=HEX`.

    Parameters: dataset: one of `downloadable_datasets()`. values: the option values as typed.
    Returns: a dict of lower-case 64-digit hex digests by archive file name.
    """
    names = [s.filename for s in dataset_info(dataset).sources] if dataset in DATASETS else []
    result: dict[str, str] = {}
    for value in values:
        name, _, digest = value.rpartition("=")
        if not name:
            if len(names) != 1:
                raise DownloadError(f"{dataset} has {len(names)} archives: give --sha256 as FILE=HEX "
                                    f"(e.g. {names[0] if names else 'FILE'}=...)")
            name = names[0]
        digest = digest.strip().lower()
        if not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise DownloadError(f"--sha256 {value!r}: a sha256 is 64 hexadecimal digits")
        result[name] = digest
    return result


# --------------------------------------------------------------------------- fetching

class _Interrupted(Exception):
    """A transfer stopped part-way; what arrived is kept in the .part file."""


def _local_path(url: str) -> Path | None:
    """The local file a URL names (file:// or a plain path), or None for a network URL."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "file":
        return Path(urllib.request.url2pathname(parsed.path))
    if parsed.scheme in ("http", "https"):
        return None
    if parsed.scheme and len(parsed.scheme) > 1:
        raise DownloadError(f"cannot fetch {url!r}: only http(s)://, file:// URLs and local paths are supported")
    return Path(url)


def _total_from_content_range(value: str | None) -> int | None:
    """Total size from a `Content-Range: bytes a-b/total` (or `bytes */total`) header."""
    match = re.search(r"/(\d+)\s*$", value or "")
    return int(match.group(1)) if match else None


def _fetch_once(url: str, part: Path, progress: bool, timeout: float) -> None:
    """One HTTP request: append to `part` from where it ends, or start it over if the server cannot resume."""
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": f"ltbench/{__version__}"}
    if have:
        headers["Range"] = f"bytes={have}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:
            if _total_from_content_range(exc.headers.get("Content-Range")) == have:
                return  # the previous run had already received every byte
            part.unlink()
            raise _Interrupted(f"the server cannot resume from byte {have}; starting over") from exc
        raise DownloadError(f"{url} answered HTTP {exc.code} {exc.reason}; the link may have moved: "
                            f"pass --url with a mirror") from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, (TimeoutError, ConnectionResetError)):   # transient: worth another try
            raise _Interrupted(f"connecting timed out or was reset ({reason})") from exc
        raise DownloadError(f"cannot reach {url} ({reason}); check the connection or pass --url with a "
                            f"mirror or a local copy of the archive") from exc

    with response:
        start = 0
        if response.status == 206:
            content_range = response.headers.get("Content-Range", "")
            match = re.match(r"bytes (\d+)-", content_range)
            start = int(match.group(1)) if match else -1
            if start != have:   # never splice mismatched pieces: start the file over
                part.unlink()
                raise _Interrupted(f"the server resumed at {content_range!r}, not at byte {have}; starting over")
        length = response.headers.get("Content-Length")
        total = start + int(length) if length is not None else None
        mode = "ab" if start else "wb"    # a 200 answer to a Range request restarts the file
        with open(part, mode) as handle, tqdm(
            total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024,
            desc=part.name.removesuffix(".part"), disable=not progress, leave=False,
        ) as bar:
            while True:
                try:
                    chunk = response.read(CHUNK_SIZE)
                except (http.client.HTTPException, OSError) as exc:
                    raise _Interrupted(f"the connection broke ({exc!r})") from exc
                if not chunk:
                    break
                handle.write(chunk)
                bar.update(len(chunk))
    received = part.stat().st_size
    if total is not None and received != total:
        raise _Interrupted(f"the connection closed after {received:,} of {total:,} bytes")


def fetch(url: str, part: Path, *, retries: int = 5, progress: bool = True, timeout: float = 60.0,
          backoff: float = 1.0) -> None:
    """Download `url` into `part`, resuming from its current size; retry cut connections with Range.

    Parameters: url: http(s) URL. part: the `.part` file (created or extended). retries: how many
        cut connections to resume within this call. progress: show a tqdm bar. timeout: seconds of
        socket silence before a connection counts as cut. backoff: first pause between retries, in
        seconds (doubled each time, at most 30).
    Returns: nothing; on return `part` holds every byte the server announced.
    """
    part.parent.mkdir(parents=True, exist_ok=True)
    failures = 0
    while True:
        try:
            _fetch_once(url, part, progress, timeout)
            return
        except _Interrupted as exc:
            failures += 1
            if failures > retries:
                kept = part.stat().st_size if part.exists() else 0
                raise DownloadError(
                    f"downloading {url} failed {failures} times, last: {exc}; the {kept:,} bytes received are "
                    f"kept in {part}: run the same command again to resume") from exc
            time.sleep(min(backoff * 2 ** (failures - 1), 30.0))


def _digests(path: Path, names: tuple[str, ...], progress: bool = False) -> dict[str, str]:
    """Hex digests of a file for several hashlib algorithms, in one read (with a bar: archives are GBs)."""
    hashes = {name: hashlib.new(name) for name in names}
    with open(path, "rb") as handle, tqdm(total=path.stat().st_size, unit="B", unit_scale=True, unit_divisor=1024,
                                          desc=f"checking {path.name}", disable=not progress, leave=False) as bar:
        for chunk in iter(lambda: handle.read(CHUNK_SIZE), b""):
            for digest in hashes.values():
                digest.update(chunk)
            bar.update(len(chunk))
    return {name: digest.hexdigest() for name, digest in hashes.items()}


# --------------------------------------------------------------------------- safe extraction

_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.xz", ".txz", ".tar.bz2", ".tbz2")


class _Extractor:
    """Writes archive members into a staging folder, refusing anything that could land outside it.

    Member paths are handled as POSIX strings relative to the staging folder (pathlib is too slow
    for archives of thousands of small files).
    """

    def __init__(self, archive: Path, staging: Path):
        self.archive = archive
        self.staging = str(staging)
        self.links: set[str] = set()                 # links made so far (staging is fresh: only ours exist)
        self.made_dirs: set[str] = {self.staging}    # folders known to exist, to skip repeated mkdir calls
        self.files = 0

    def refuse(self, name: str, why: str) -> DownloadError:
        return DownloadError(f"{self.archive.name} is unsafe: member {name!r} {why}; refusing it, so nothing "
                             f"was extracted (the verified archive stays in {self.archive.parent})")

    def member_path(self, name: str) -> str:
        """The member's path relative to the root ("" for the root itself); raises if it could escape."""
        normalised = name.replace("\\", "/")   # Windows-made archives separate with backslashes
        if normalised.startswith("/") or re.match(r"^[A-Za-z]:", normalised):
            raise self.refuse(name, "has an absolute path")
        parts = [p for p in normalised.split("/") if p not in ("", ".")]
        if ".." in parts:
            raise self.refuse(name, "has a '..' component that leaves the dataset folder")
        if parts and parts[0] == DOWNLOADS_DIR:
            raise self.refuse(name, f"would overwrite LTBench's own {DOWNLOADS_DIR} folder")
        return "/".join(parts)

    def destination(self, name: str, relative: str) -> str:
        """Where a member goes in staging; refuses paths through (or onto) a link an earlier member made."""
        if self.links:
            ancestor = relative
            while ancestor:
                if ancestor in self.links:
                    raise self.refuse(name, f"would be written through the link {ancestor!r}")
                ancestor = posixpath.dirname(ancestor)
        return os.path.join(self.staging, relative)

    def make_parent(self, path: str) -> None:
        parent = os.path.dirname(path)
        if parent not in self.made_dirs:
            os.makedirs(parent, exist_ok=True)
            self.made_dirs.add(parent)

    def directory(self, name: str) -> None:
        relative = self.member_path(name)
        if relative:
            path = self.destination(name, relative)
            os.makedirs(path, exist_ok=True)
            self.made_dirs.add(path)

    def file(self, name: str, source: BinaryIO) -> None:
        relative = self.member_path(name)
        if not relative:
            raise self.refuse(name, "is a file named like the root folder")
        path = self.destination(name, relative)
        self.make_parent(path)
        with open(path, "wb") as handle:
            shutil.copyfileobj(source, handle, CHUNK_SIZE)
        self.files += 1

    def symlink(self, name: str, target: str) -> None:
        relative = self.member_path(name)
        if not relative:
            raise self.refuse(name, "is a link named like the root folder")
        target = target.replace("\\", "/")
        if target.startswith("/") or re.match(r"^[A-Za-z]:", target):
            raise self.refuse(name, f"is a link to the absolute path {target!r}")
        resolved = posixpath.normpath(posixpath.join(posixpath.dirname(relative), target))
        if resolved == ".." or resolved.startswith("../"):
            raise self.refuse(name, f"is a link to {target!r}, outside the dataset folder")
        path = self.destination(name, relative)
        self.make_parent(path)
        if os.path.isdir(path):
            raise self.refuse(name, "is a link that would replace a folder")
        if os.path.lexists(path):
            os.unlink(path)
        os.symlink(target, path)
        self.links.add(relative)

    def hardlink(self, name: str, target: str) -> None:
        """A tar hard link names an earlier member: copy that file (never link across the tree)."""
        source = self.member_path(target)
        path = self.destination(target, source) if source else ""
        if not source or not os.path.isfile(path):
            raise self.refuse(name, f"is a hard link to {target!r}, which is not a file extracted before it")
        with open(path, "rb") as handle:
            self.file(name, handle)

    def check_links(self) -> None:
        """After every member is in place, each link must resolve inside the staging folder (chains included)."""
        inside = os.path.realpath(self.staging)
        for relative in sorted(self.links):
            resolved = os.path.realpath(os.path.join(self.staging, relative))
            if os.path.commonpath([inside, resolved]) != inside:
                raise self.refuse(relative, "is a link that resolves outside the dataset folder")


def _extract_tar(archive: Path, extractor: _Extractor, bar: tqdm) -> None:
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                if member.isdir():
                    extractor.directory(member.name)
                elif member.isreg():
                    source = tar.extractfile(member)
                    assert source is not None, f"tar member {member.name} is regular but unreadable"
                    with source:
                        extractor.file(member.name, source)
                elif member.issym():
                    extractor.symlink(member.name, member.linkname)
                elif member.islnk():
                    extractor.hardlink(member.name, member.linkname)
                else:
                    raise extractor.refuse(member.name, "is a device, FIFO or other special file")
                bar.update(1)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DownloadError(f"{archive} is not a readable tar archive ({exc}); delete it and download again") from exc


def _extract_zip(archive: Path, extractor: _Extractor, bar: tqdm) -> None:
    try:
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                mode = info.external_attr >> 16
                if info.is_dir():
                    extractor.directory(info.filename)
                elif (mode & 0o170000) == 0o120000:   # a Unix symlink: the member's data is its target
                    extractor.symlink(info.filename, zf.read(info).decode("utf-8"))
                else:
                    with zf.open(info) as source:
                        extractor.file(info.filename, source)
                bar.update(1)
    except (zipfile.BadZipFile, EOFError, OSError) as exc:
        raise DownloadError(f"{archive} is not a readable zip archive ({exc}); delete it and download again") from exc


def _merge_into(source: Path, target: Path) -> None:
    """Move the staged tree into the root, entry by entry; existing files of the same name are replaced."""
    target.mkdir(parents=True, exist_ok=True)
    for entry in sorted(source.iterdir()):
        destination = target / entry.name
        entry_is_dir = entry.is_dir() and not entry.is_symlink()
        destination_is_dir = destination.is_dir() and not destination.is_symlink()
        if entry_is_dir and destination_is_dir:
            _merge_into(entry, destination)
        elif destination_is_dir:
            raise DownloadError(f"cannot extract {entry.name!r} into {target}: a folder of that name is in the way")
        else:
            os.replace(entry, destination)


def extract_archive(archive: Path, root: Path, *, progress: bool = True) -> int:
    """Safely extract a tar (any compression) or zip archive into `root`.

    Members are written into `<root>/.downloads/<archive>.extracting` first; an absolute path, a `..`
    component, a link resolving outside the root, a write through a link, or a device file aborts the
    whole extraction and removes the staging folder, so nothing reaches `root`.

    Parameters: archive: the archive file. root: the folder to extract into (created if needed).
    Returns: the number of files (regular files and hard links) extracted.
    """
    root = Path(root)
    staging = root / DOWNLOADS_DIR / f"{archive.name}.extracting"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    extractor = _Extractor(archive, staging)
    name = archive.name.lower()
    is_zip = name.endswith(".zip") or (not name.endswith(_TAR_SUFFIXES) and zipfile.is_zipfile(archive))
    try:
        with tqdm(desc=f"extracting {archive.name}", unit=" files", disable=not progress, leave=False) as bar:
            (_extract_zip if is_zip else _extract_tar)(archive, extractor, bar)
        extractor.check_links()
        _merge_into(staging, root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return extractor.files


# --------------------------------------------------------------------------- the whole download

@dataclass
class ArchiveReport:
    """What happened to one archive."""

    filename: str
    url: str
    sha256: str             # computed from the bytes received
    md5: str | None         # computed only where no sha256 was pinned (Zenodo lists md5 checksums)
    pinned: bool            # True: `sha256` matched a pinned or user-given checksum
    files: int | None       # files extracted now; None when an earlier run had already extracted it


@dataclass
class DownloadReport:
    """The result of `download_dataset`: per-archive checksums and the file check afterwards."""

    dataset: str
    root: Path
    archives: list[ArchiveReport] = field(default_factory=list)
    files_checked: int = 0      # images and masks of the dataset's file list, all found in the root
    unexpected_files: int = 0   # images in the root that the file list does not name

    @property
    def unpinned(self) -> list[ArchiveReport]:
        """Archives whose checksum nobody pinned: the user should compare them with the source."""
        return [a for a in self.archives if not a.pinned]


def _verify(path: Path, source: ArchiveSource, progress: bool, *, downloaded: bool) -> dict[str, str]:
    """Digests of an archive; on a mismatch raises before any extraction, deleting the file if we downloaded it.

    Parameters: path: the archive; source: its pinned checksum (None: only compute); progress: show
        a bar; downloaded: True for a file LTBench fetched (deleted on a mismatch, so that the next run
        fetches it afresh), False for the user's own copy (left as it is).
    Returns: {"sha256": hex} plus "md5" where no checksum is pinned.
    """
    digests = _digests(path, ("sha256",) if source.sha256 else ("sha256", "md5"), progress)
    if source.sha256 and digests["sha256"] != source.sha256:
        if downloaded:
            path.unlink()
        fate = ("the bad file was deleted: run the command again to download it afresh" if downloaded
                else f"{path} was left as it is")
        raise DownloadError(
            f"{source.filename} from {source.url} has sha256 {digests['sha256']}, expected {source.sha256}: "
            f"nothing was extracted and {fate}. If you trust this copy, pass --sha256 {digests['sha256']}")
    return digests


def _fetch_and_extract(source: ArchiveSource, root: Path, *, keep_archive: bool, retries: int,
                       progress: bool, timeout: float, backoff: float) -> ArchiveReport:
    downloads = root / DOWNLOADS_DIR
    marker = downloads / f"{source.filename}.extracted.json"
    if marker.exists():
        done = json.loads(marker.read_text())
        if source.sha256 is None or done.get("sha256") == source.sha256:
            return ArchiveReport(source.filename, done.get("url", source.url), done["sha256"], done.get("md5"),
                                 source.sha256 is not None, None)

    local = _local_path(source.url)
    if local is not None:   # a mirror on disk: verify and extract it in place, never delete it
        if not local.is_file():
            raise DownloadError(f"--url {source.url!r}: no such file")
        archive = local
        digests = _verify(local, source, progress, downloaded=False)
    else:
        archive = downloads / source.filename
        if archive.exists():   # downloaded and verified earlier, extraction did not finish
            digests = _verify(archive, source, progress, downloaded=True)
        else:
            part = downloads / f"{source.filename}.part"
            fetch(source.url, part, retries=retries, progress=progress, timeout=timeout, backoff=backoff)
            digests = _verify(part, source, progress, downloaded=True)
            os.replace(part, archive)

    files = extract_archive(archive, root, progress=progress)
    write_json(marker, {"filename": source.filename, "url": source.url, "sha256": digests["sha256"],
                        "md5": digests.get("md5"), "files": files})
    if local is None and not keep_archive:
        archive.unlink()
    return ArchiveReport(source.filename, source.url, digests["sha256"], digests.get("md5"),
                         source.sha256 is not None, files)


def download_root(dataset: str, root: str | os.PathLike | None) -> Path:
    """Where a download goes: `root` if given, else `$LTBENCH_DATA/<dataset>` (need not exist yet).

    Parameters: dataset: one of `downloadable_datasets()`. root: the `--root` value or None.
    Returns: the dataset root to fill.
    """
    if root is not None:
        return Path(root).expanduser()
    if os.environ.get("LTBENCH_DATA"):
        return Path(os.environ["LTBENCH_DATA"]).expanduser() / dataset
    raise DownloadError(f"nowhere to put {dataset}: pass --root DIR, or set LTBENCH_DATA so that it goes to "
                        f"$LTBENCH_DATA/{dataset}")


def download_dataset(dataset: str, root: str | os.PathLike, *, url: str | None = None,
                     checksums: Mapping[str, str] | None = None, keep_archives: bool = False,
                     retries: int = 5, progress: bool = True, timeout: float = 60.0, backoff: float = 1.0,
                     verify_files: bool = True) -> DownloadReport:
    """Download, verify and extract every archive of a dataset into `root`, then check its file list.

    Archives go to `<root>/.downloads/` (`.part` while incomplete, resumable across runs); an archive
    already extracted by an earlier run (a marker in that folder) is skipped. A checksum mismatch
    deletes the downloaded file and raises before anything is extracted.

    Parameters: dataset: "mvtec", "visa" or "dagm". root: the dataset root to fill. url: a mirror
        (see `archive_sources`). checksums: file name -> sha256 (see `parse_checksums`). keep_archives:
        keep the archives after extraction. retries: cut connections resumed per archive. progress:
        show tqdm bars. timeout: socket timeout in seconds. backoff: first pause between retries, in
        seconds. verify_files: check the dataset's file list afterwards.
    Returns: a `DownloadReport`; raises `DatasetError` when the root then lacks files of the dataset's
        file list (the shipped lists for MVTec AD and VisA).
    """
    root = Path(root).expanduser()
    sources = archive_sources(dataset, url, checksums)
    root.mkdir(parents=True, exist_ok=True)
    report = DownloadReport(dataset=dataset, root=root)
    for source in sources:
        report.archives.append(_fetch_and_extract(source, root, keep_archive=keep_archives, retries=retries,
                                                  progress=progress, timeout=timeout, backoff=backoff))
    if verify_files:
        from ltbench.datasets import check_files

        try:
            check = check_files(dataset, root)
        except DatasetError as exc:
            raise DatasetError(f"the {dataset} archives were extracted into {root}, but the file check "
                               f"failed: {exc}") from exc
        if check.missing:
            raise DatasetError(
                f"the {dataset} archives were extracted into {root}, but {len(check.missing)} of the "
                f"{check.expected} expected files are missing (first: {', '.join(check.missing[:5])}); delete "
                f"{root / DOWNLOADS_DIR} and download again, or pass --url with a complete copy")
        report.files_checked = check.expected
        report.unexpected_files = len(check.unexpected)
    return report
