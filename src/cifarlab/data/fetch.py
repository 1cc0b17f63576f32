"""Resumable download that publishes a file only once it is complete and verified.

(Not named ``download.py``: that would clash with the ``cifarlab.data.download`` function.)
"""

from __future__ import annotations

import hashlib
import http.client
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from cifarlab.data.cache import _fsync, _fsync_dir
from cifarlab.errors import ChecksumError, DataError, StorageError
from cifarlab.fileio import DISK_FULL_ERRNOS


def download(url: str, dest: Path, md5: str | None, *, progress: bool = True) -> Path:
    """Download ``url`` to ``dest``, resuming a previous ``dest.part``; return ``dest``.

    ``dest`` appears only once the file is complete and (if ``md5`` is given)
    verified, so an interrupted or corrupt download is never mistaken for a good one.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_suffix(dest.suffix + ".part")
    try:
        _fetch(url, part, progress)
    except OSError as e:
        if e.errno not in DISK_FULL_ERRNOS:
            raise _download_error(url, e) from e
        kept = part.stat().st_size if part.exists() else 0
        raise StorageError(
            f"Could not download {url}: the disk is full ({e.strerror}). {part} keeps the {kept:,} bytes "
            "received so far; free some space and run again to resume."
        ) from e
    except (http.client.HTTPException, ValueError) as e:
        raise _download_error(url, e) from e
    if md5 is not None:
        actual = _md5_file(part)
        if actual != md5:
            part.unlink()
            raise ChecksumError(
                f"MD5 of the file downloaded from {url} is {actual}, expected {md5}; it was deleted. "
                "Try again later, or download it manually and pass it with --data PATH."
            )
    os.replace(part, dest)
    _fsync_dir(dest.parent)
    return dest


def _download_error(url: str, e: Exception) -> DataError:
    return DataError(
        f"Could not download {url}: {e}. Run again to resume, or download it manually and pass the "
        "file with --data PATH."
    )


def _fetch(url: str, part: Path, progress: bool) -> None:
    """Append the rest of ``url`` to ``part`` (all of it if the server cannot resume)."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "cifarlab", **({"Range": f"bytes={offset}-"} if offset else {})}
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:  # our .part is longer than the file: it is not a prefix of it
            part.unlink()
            return _fetch(url, part, progress)
        raise
    with response:
        resumed = offset > 0 and response.status == 206
        content_range = response.headers.get("Content-Range", "")
        if resumed and not content_range.startswith(f"bytes {offset}-"):
            part.unlink()  # the server resumed somewhere else: the .part cannot be trusted
            return _fetch(url, part, progress)
        if not resumed:
            offset = 0  # the server sent the whole file (200): start over
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length is not None else None
        with open(part, "ab" if resumed else "wb") as f, tqdm(
            total=total, initial=offset, unit="B", unit_scale=True, desc=part.name[: -len(".part")],
            file=sys.stderr, disable=not progress,
        ) as bar:  # fmt: skip
            while chunk := response.read(1 << 20):
                f.write(chunk)
                bar.update(len(chunk))
            _fsync(f)
            received = f.tell()
    if total is not None and received != total:
        raise OSError(f"connection closed after {received:,} of {total:,} bytes")


def _md5_file(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
