"""Downloading datasets: HTTP(S) with urllib, md5 check, safe tar.gz extraction.

Each file is streamed into a temporary file in the target folder, its md5 compared with the
publisher's, and only then moved into place with ``os.replace``; a mismatching file is
deleted. Files already present with the right md5 are not fetched again. Archives
(CIFAR) are extracted member by member into the dataset folder, refusing absolute paths,
``..``, links and special files, then removed.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from ..errors import DataError, DownloadError
from .registry import DatasetSpec, Resource, dataset_dir, get_spec, resolve_root

__all__ = ["download", "md5sum", "fetch_file", "extract_members"]

CHUNK = 1 << 20
TIMEOUT_S = 60
USER_AGENT = "budgetprune (python urllib)"


def md5sum(path: Path) -> str:
    """Hex md5 of a file."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _has_md5(path: Path, md5: str) -> bool:
    return path.is_file() and md5sum(path) == md5


def _progress_bar(total: int | None, desc: str, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return None
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr)


def _copy_hashing(src: BinaryIO, dst: BinaryIO, bar=None) -> str:
    h = hashlib.md5()
    for block in iter(lambda: src.read(CHUNK), b""):
        h.update(block)
        dst.write(block)
        if bar is not None:
            bar.update(len(block))
    return h.hexdigest()


def _one_line(e: BaseException) -> str:
    text = e if isinstance(e, urllib.error.HTTPError) else (getattr(e, "reason", None) or e)
    return " ".join(str(text).split()) or type(e).__name__


def _stream(url: str, tmp: BinaryIO, desc: str, progress: bool) -> str:
    """Write the body of ``url`` to ``tmp``; return its md5."""
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
        length = response.headers.get("Content-Length")
        bar = _progress_bar(int(length) if length and length.isdigit() else None, desc, progress)
        try:
            return _copy_hashing(response, tmp, bar)
        finally:
            if bar is not None:
                bar.close()


def fetch_file(urls: tuple[str, ...], dest: Path, md5: str, progress: bool = True) -> Path:
    """Download ``dest`` from the first of ``urls`` that works and matches ``md5``."""
    failures: list[str] = []
    mismatch: tuple[str, str] | None = None
    for url in urls:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                actual = _stream(url, out, dest.name, progress)
            if actual != md5:
                mismatch = (url, actual)
                continue
            os.replace(tmp, dest)
            return dest
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
            failures.append(f"{url} ({_one_line(e)})")
        finally:
            tmp.unlink(missing_ok=True)
    if mismatch is not None:
        url, actual = mismatch
        raise DownloadError(
            f"{dest.name} downloaded from {url} has md5 {actual}, expected {md5}; the file was removed: "
            f"try again later, or download it by hand into {dest.parent} and check its md5"
        )
    raise DownloadError(
        f"could not download {dest.name}: {'; '.join(failures)}; download it by hand "
        f"(from {urls[0]}) into {dest.parent} and run again"
    )


def _check_member(archive: Path, member: tarfile.TarInfo) -> None:
    name = member.name
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if name.startswith(("/", "\\")) or (parts and ":" in parts[0]) or ".." in parts:
        raise DownloadError(
            f"{archive} holds an unsafe member {name!r} (absolute path or '..'); refusing to extract it: "
            "delete the archive and download it from the publisher"
        )
    if not (member.isfile() or member.isdir()):
        raise DownloadError(
            f"{archive} holds {name!r}, a link or special file; refusing to extract it: "
            "delete the archive and download it from the publisher"
        )


def extract_members(archive: Path, dest: Path, members: tuple[tuple[str, str], ...]) -> None:
    """Extract the listed ``(path in archive, md5)`` regular files of a tar.gz into ``dest``
    (file names only), checking every member name and each extracted md5."""
    wanted = {name: md5 for name, md5 in members}
    try:
        with tarfile.open(archive, "r:gz") as tar:
            found: dict[str, tarfile.TarInfo] = {}
            for member in tar.getmembers():
                _check_member(archive, member)
                name = member.name[2:] if member.name.startswith("./") else member.name
                if name in wanted and member.isfile():
                    found[name] = member
            missing = [n for n in wanted if n not in found]
            if missing:
                raise DownloadError(
                    f"{archive} lacks {', '.join(missing)}: it is not the expected archive; "
                    "delete it and download it again"
                )
            for name, member in found.items():
                target = dest / PurePosixPath(name).name
                src = tar.extractfile(member)
                assert src is not None
                fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=dest)
                try:
                    with os.fdopen(fd, "wb") as out, src:
                        actual = _copy_hashing(src, out)
                    if actual != wanted[name]:
                        raise DownloadError(
                            f"{name} extracted from {archive} has md5 {actual}, expected {wanted[name]}; "
                            "it was removed: delete the archive and download it again"
                        )
                    os.replace(tmp_name, target)
                finally:
                    Path(tmp_name).unlink(missing_ok=True)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DownloadError(
            f"{archive} is not a readable tar.gz archive ({_one_line(e)}); delete it and download it again"
        ) from e


def _ensure(resource: Resource, dest: Path, mirror: str | None, progress: bool) -> None:
    urls = (f"{mirror.rstrip('/')}/{resource.filename}",) if mirror else resource.urls
    target = dest / resource.filename
    if not resource.members:
        if not _has_md5(target, resource.md5):
            fetch_file(urls, target, resource.md5, progress)
        return
    if all(_has_md5(dest / PurePosixPath(name).name, md5) for name, md5 in resource.members):
        return
    if not _has_md5(target, resource.md5):
        fetch_file(urls, target, resource.md5, progress)
    try:
        extract_members(target, dest, resource.members)
    except DownloadError:
        target.unlink(missing_ok=True)
        raise
    target.unlink(missing_ok=True)


def download(
    name: str, root: str | os.PathLike | None = None, mirror: str | None = None, progress: bool = True
) -> Path:
    """Fetch the canonical files of dataset ``name`` into its folder under ``root`` and
    return that folder.

    ``mirror`` replaces the base URL (``<mirror>/<file name>``). Files already present with
    the publisher's md5 are skipped. Embedded datasets (``demo``) need nothing: their
    package folder is returned.
    """
    spec: DatasetSpec = get_spec(name)
    if spec.folder is None:
        if spec.resources:  # pragma: no cover - no such dataset yet
            raise DataError(f"dataset '{name}' has downloads but no folder; this is a bug in its registration")
        from .demo import demo_folder

        return Path(str(demo_folder()))
    base = resolve_root(root)
    dest = dataset_dir(base, spec.folder, spec.markers)
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DownloadError(
            f"cannot create dataset folder {dest} ({e.strerror or e}): choose a writable data root"
        ) from e
    for resource in spec.resources:
        _ensure(resource, dest, mirror, progress)
    return dest

