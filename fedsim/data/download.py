"""Download a dataset's files: checksummed, resumable, moved into place atomically.

Each file is fetched with the standard library's urllib into ``<name>.part``. A retry
(within the same command, or by running it again) resumes with an HTTP Range request
from the bytes already there. Only a file whose checksum matches the published one is
renamed to its final name; a mismatch deletes the partial file and says so. Archives
are unpacked into a temporary folder beside the target and moved into place, after
every member's path has been checked to stay inside that folder.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from fedsim.data.progress import progress_bar
from fedsim.data.sources import Resource, Source
from fedsim.errors import UserError

CHUNK = 1 << 16
USER_AGENT = "fedsim-data-download"


class _Interrupted(Exception):
    """The connection closed before the whole file arrived."""


def download(
    source: Source,
    root: Path,
    *,
    attempts: int = 3,
    timeout: float = 60.0,
    log: Callable[[str], None] = print,
) -> Path:
    """Fetch, verify and unpack every resource of ``source`` into ``root``/``source.folder``.

    Returns that folder. Files already present with the right checksum are kept.
    """
    if not source.resources:
        raise UserError(
            f"{source.name} has no direct download ({source.manual}); get it from {source.homepage} "
            f"and put {source.expected} in {Path(root) / source.folder}"
        )
    folder = Path(root) / source.folder
    folder.mkdir(parents=True, exist_ok=True)
    for resource in source.resources:
        path = fetch(source, resource, folder, attempts=attempts, timeout=timeout, log=log)
        if resource.unpack:
            unpack(source, path, folder, log=log)
    return folder


def fetch(
    source: Source,
    resource: Resource,
    folder: Path,
    *,
    attempts: int = 3,
    timeout: float = 60.0,
    log: Callable[[str], None] = print,
) -> Path:
    """One file: resume or start its .part file, verify it, and rename it into place."""
    target = folder / resource.filename
    if target.exists():
        if verify(resource, target) is not False:
            log(f"{source.name}: {target} is already here")
            return target
        log(f"{source.name}: {target} does not match its checksum; downloading it again")
        target.unlink()
    _unpacked_marker(target).unlink(missing_ok=True)  # a new archive must be unpacked again
    partial = target.with_name(target.name + ".part")
    failure: Exception | None = None
    for _attempt in range(max(1, attempts)):
        try:
            _transfer(resource.url, partial, timeout)
            failure = None
            break
        except urllib.error.HTTPError as error:
            if error.code == 416 and partial.exists():  # nothing left to send: the .part is whole
                failure = None
                break
            raise UserError(f"{source.name}: {resource.url} answered HTTP {error.code} {error.reason}") from None
        except (_Interrupted, urllib.error.URLError, http.client.HTTPException, OSError) as error:
            failure = error
    if failure is not None:
        have = partial.stat().st_size if partial.exists() else 0
        raise UserError(
            f"{source.name}: downloading {resource.url} failed after {attempts} attempts ({failure}); "
            f"{have} bytes are kept in {partial}: run the same command again to resume"
        )
    checked = verify(resource, partial)
    if checked is False:
        algorithm, expected = _expected_digest(resource)
        actual = _digest(partial, algorithm)
        partial.unlink()
        raise UserError(
            f"{source.name}: {resource.filename} from {resource.url} has {algorithm} {actual}, expected {expected}; "
            "the download was deleted (run again to retry; if it persists the file on the server has changed)"
        )
    if checked is None:
        log(f"{source.name}: no checksum is published for {resource.filename}; it was not verified")
    os.replace(partial, target)
    log(f"{source.name}: {target}")
    return target


def _transfer(url: str, partial: Path, timeout: float) -> None:
    """Append the rest of ``url`` to ``partial`` (all of it when the server ignores Range)."""
    offset = partial.stat().st_size if partial.exists() else 0
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as response:
        resumed = offset > 0 and response.status == 206 and _range_start(response) == offset
        if not resumed:
            offset = 0
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length is not None else None
        received = offset
        with (
            partial.open("ab" if resumed else "wb") as out,
            progress_bar(f"{partial.name[: -len('.part')]}", total, in_bytes=True) as advance,
        ):
            advance(offset)
            while chunk := response.read(CHUNK):
                out.write(chunk)
                received += len(chunk)
                advance(len(chunk))
    if total is not None and received < total:
        raise _Interrupted(f"connection closed after {received} of {total} bytes")


def _range_start(response: http.client.HTTPResponse) -> int | None:
    content_range = response.headers.get("Content-Range", "")  # "bytes 100-999/1000"
    try:
        return int(content_range.split()[1].split("-")[0])
    except (IndexError, ValueError):
        return None


def _expected_digest(resource: Resource) -> tuple[str, str | None]:
    if resource.sha256:
        return "sha256", resource.sha256.lower()
    if resource.md5:
        return "md5", resource.md5.lower()
    return "sha256", None


def _digest(path: Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def verify(resource: Resource, path: Path) -> bool | None:
    """True if ``path`` matches the published checksum (SHA-256, else MD5), False if it does
    not, None if no checksum is known."""
    algorithm, expected = _expected_digest(resource)
    if expected is None:
        return None
    return _digest(path, algorithm) == expected


def unpack(source: Source, archive: Path, folder: Path, *, log: Callable[[str], None] = print) -> None:
    """Unpack a .tar(.gz) or .zip into ``folder``, refusing members that would land outside it.

    A marker file records a finished unpack, so running the command again skips it.
    A corrupt archive is deleted, so the next run downloads it again.
    """
    marker = _unpacked_marker(archive)
    if marker.exists():
        return
    staging = Path(tempfile.mkdtemp(dir=folder, prefix=f".{archive.name}.unpacking-"))
    try:
        try:
            if zipfile.is_zipfile(archive):
                _unzip(source, archive, staging)
            else:
                _untar(source, archive, staging)
        except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as error:
            archive.unlink(missing_ok=True)
            raise UserError(
                f"{source.name}: cannot unpack {archive} ({error}); it was deleted, run the same command to download it again"
            ) from None
        for entry in staging.iterdir():
            target = folder / entry.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()
            os.replace(entry, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    marker.touch()
    log(f"{source.name}: unpacked {archive.name} into {folder}")


def _unpacked_marker(archive: Path) -> Path:
    return archive.with_name(f".{archive.name}.unpacked")


def _check_member(source: Source, archive: Path, name: str) -> None:
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if name.startswith(("/", "\\")) or (parts and parts[0].endswith(":")) or ".." in parts:
        raise UserError(f"{source.name}: refusing to unpack {archive}: member {name!r} would land outside the folder")


def _untar(source: Source, archive: Path, staging: Path) -> None:
    with tarfile.open(archive) as tar:
        members = tar.getmembers()
        for member in members:
            _check_member(source, archive, member.name)
            if member.issym() or member.islnk():
                raise UserError(f"{source.name}: refusing to unpack {archive}: member {member.name!r} is a link")
        # The "data" filter also rejects special files and strips unsafe permission bits.
        tar.extractall(staging, members=members, filter="data")


def _unzip(source: Source, archive: Path, staging: Path) -> None:
    with zipfile.ZipFile(archive) as bundle:
        for name in bundle.namelist():
            _check_member(source, archive, name)
        bad = bundle.testzip()
        if bad is not None:
            raise zipfile.BadZipFile(f"member {bad} fails its CRC check")
        bundle.extractall(staging)
