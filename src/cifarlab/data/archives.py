"""Read a folder, tar or zip into memory, member by member, without extracting anything.

Nothing is ever written to disk, so no member can land outside a folder; still, members that
are absolute or contain ``..`` are refused (a sign of a hostile or broken archive), and links
(symbolic and hard) are skipped, never followed. Limits make a hostile archive fail fast and
cheaply instead of exhausting memory:

* at most MAX_ARCHIVE_MEMBERS entries (every header counts: files, folders, links);
* at most MAX_ARCHIVE_BYTES of member data, checked against each member's declared size
  before it is read, and for tar archives also against the bytes actually decompressed
  (tarfile reads long-name and pax headers whole before we see the member);
* a decompression-bomb limit: past BOMB_FLOOR_BYTES, the data may not exceed
  MAX_EXPANSION_RATIO times the archive's own size.

Any failure of tarfile, zipfile or the decompressors (damaged, truncated, encrypted or
unsupported input) becomes a DataError that names the archive.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import lzma
import os
import stat
import tarfile
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, cast

from cifarlab.errors import DataError

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")

# Limits on what an archive may expand to. The official CIFAR-100 archive holds
# 3 members / ~180 MB; an ImageFolder copy of CIFAR holds ~60,000 files.
MAX_ARCHIVE_BYTES = 2 * 1024**3
MAX_ARCHIVE_MEMBERS = 1_000_000
# Image datasets barely compress (PNG and JPEG are compressed already; the official CIFAR
# pickles expand 1.1x), while a decompression bomb expands 100-1000x. Small archives are
# exempt: a few MB of solid-colour test images may compress very well.
MAX_EXPANSION_RATIO = 100
BOMB_FLOOR_BYTES = 256 * 1024**2
# One file of a dataset folder: the official CIFAR batches are 31 MB, an image far less.
MAX_FILE_BYTES = 256 * 1024**2


@dataclass
class _Tree:
    """Regular files of an archive or folder: relative posix path -> bytes or file."""

    origin: Path
    files: dict[str, bytes | Path]
    prefix: str = ""  # wrapper folder stripped from every name

    def read(self, name: str) -> bytes:
        value = self.files[name]
        return value if isinstance(value, bytes) else _read_regular_file(value)

    def where(self, name: str) -> str:
        """Where ``name`` is, in words a user can find it by."""
        value = self.files[name]
        return str(value) if isinstance(value, Path) else f"{self.origin} (member {self.prefix}{name})"


def _read_regular_file(path: Path) -> bytes:
    """A folder's file, after checking that it is one: a FIFO would block the read forever and a
    device such as /dev/zero (also behind a symlink) would never end, so neither is opened."""
    info = path.stat()  # follows symlinks: the type of what would be read
    if not stat.S_ISREG(info.st_mode):
        raise DataError(f"{path} is not a regular file (a FIFO, device, socket or a link to one); "
                        "refusing to read it. Remove it from the dataset folder.")
    if info.st_size > MAX_FILE_BYTES:
        raise DataError(f"{path} holds {info.st_size:,} bytes; files in a dataset folder are read up to "
                        f"{MAX_FILE_BYTES:,}. Remove it from the dataset folder.")
    with open(path, "rb") as f:
        data = f.read(MAX_FILE_BYTES + 1)  # a file that grows while read is still bounded
    if len(data) > MAX_FILE_BYTES:
        raise DataError(f"{path} grew beyond {MAX_FILE_BYTES:,} bytes while it was read")
    return data


def _ignored(parts: tuple[str, ...]) -> bool:
    # macOS archives carry __MACOSX/ and ._* resource forks; editors leave dotfiles.
    return any(p.startswith(".") or p == "__MACOSX" for p in parts)


def _open_tree(path: Path) -> _Tree:
    if path.is_dir():
        tree = _Tree(path, _folder_files(path))
    elif _is_tar(path):
        tree = _Tree(path, _tar_files(path))
    elif _is_zip(path):
        tree = _Tree(path, _zip_files(path))
    else:
        raise DataError(f"{path} is neither a folder nor a tar/tar.gz/zip archive. Pass one of those with --data PATH.")
    return _strip_wrapper(tree)


def _is_tar(path: Path) -> bool:
    try:
        return tarfile.is_tarfile(path)
    except Exception:  # noqa: BLE001 - a damaged compressed stream (EOFError, zlib/lzma errors):
        return True  # still meant as a tar; reading it reports the damage


def _is_zip(path: Path) -> bool:
    try:
        return zipfile.is_zipfile(path)
    except Exception:  # noqa: BLE001 - same as above
        return True


def _folder_files(root: Path) -> dict[str, bytes | Path]:
    files: dict[str, bytes | Path] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel_dir = PurePosixPath(Path(dirpath).relative_to(root).as_posix())
        for fname in filenames:
            rel = rel_dir / fname
            if not _ignored(rel.parts):
                files[str(rel)] = Path(dirpath) / fname
    return files


def _safe_member_name(archive: Path, name: str) -> str | None:
    """Normalised member name, None for ignorable entries; DataError for escaping ones."""
    posix = PurePosixPath(name.replace("\\", "/"))
    if posix.is_absolute() or ".." in posix.parts:
        raise DataError(
            f"{archive} contains the unsafe member {name!r} (absolute path or '..'); refusing to read it. "
            "Re-create the archive with relative paths."
        )
    parts = tuple(p for p in posix.parts if p != ".")
    return None if not parts or _ignored(parts) else "/".join(parts)


class _Budget:
    """Counts entries and bytes so a hostile archive cannot exhaust memory (limits read at use)."""

    def __init__(self, archive: Path) -> None:
        self.archive, self.members, self.bytes, self.streamed = archive, 0, 0, 0
        self.archive_size = archive.stat().st_size

    def entry(self, n: int = 1) -> None:
        """`n` more headers of any kind."""
        self.members += n
        if self.members > MAX_ARCHIVE_MEMBERS:
            self._refuse(f"holds more than {MAX_ARCHIVE_MEMBERS:,} entries")

    def add(self, size: int, name: str) -> None:
        """A member of `size` declared bytes is about to be read."""
        if size < 0:
            raise DataError(f"{self.archive}: member {name!r} declares a negative size ({size}); "
                            "the archive is damaged. Download or re-create it.")
        self.bytes += size
        self._check(self.bytes)

    def stream(self, n: int) -> None:
        """`n` more bytes were decompressed (headers and padding included)."""
        self.streamed += n
        overhead = 1024 * self.members + (1 << 20)  # tar headers and block padding
        self._check(self.streamed - overhead)

    def _check(self, expanded: int) -> None:
        if expanded > MAX_ARCHIVE_BYTES:
            self._refuse(f"expands to more than {MAX_ARCHIVE_BYTES / 1024**3:g} GiB")
        if expanded > BOMB_FLOOR_BYTES and expanded > MAX_EXPANSION_RATIO * self.archive_size:
            self._refuse(f"expands to more than {MAX_EXPANSION_RATIO}x its size of {self.archive_size:,} bytes "
                         "(a decompression bomb?)")

    def _refuse(self, why: str) -> None:
        raise DataError(f"{self.archive} {why}; refusing to read it. Extract it yourself and pass the "
                        "folder with --data PATH if it is genuine.")


class _Metered:
    """A read-only stream that reports every byte read to a budget (tarfile reads through it)."""

    def __init__(self, stream: IO[bytes], budget: _Budget) -> None:
        self.stream, self.budget = stream, budget

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        self.budget.stream(len(data))
        return data


def _decompressed(path: Path) -> IO[bytes]:
    """The archive's bytes, decompressed by magic number (gzip, bzip2, xz) or as they are."""
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic.startswith(b"\x1f\x8b"):
        return cast(IO[bytes], gzip.open(path, "rb"))
    if magic.startswith(b"BZh"):
        return bz2.open(path, "rb")
    if magic.startswith(b"\xfd7zXZ\x00"):
        return lzma.open(path, "rb")
    return open(path, "rb")


@contextlib.contextmanager
def _reading(path: Path, kind: str) -> Iterator[None]:
    """Turn whatever the archive libraries raise on damaged input into one DataError."""
    try:
        yield
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - tarfile, zipfile and the codecs raise many types on bad input
        raise DataError(
            f"Could not read the {kind} archive {path}: {type(e).__name__}: {e}. It is damaged, incomplete, "
            "encrypted or uses an unsupported compression: download or re-create it."
        ) from e


def _tar_files(path: Path) -> dict[str, bytes | Path]:
    files: dict[str, bytes | Path] = {}
    links: list[str] = []
    budget = _Budget(path)
    with _reading(path, "tar"), _decompressed(path) as raw:
        # Streaming mode ("r|") reads the file once, front to back.
        with tarfile.open(fileobj=cast(IO[bytes], _Metered(raw, budget)), mode="r|") as tar:
            while (member := tar.next()) is not None:
                tar.members.clear()  # type: ignore[attr-defined]  # streaming needs no index of past members: memory stays flat
                budget.entry()
                name = _safe_member_name(path, member.name)
                if member.issym() or member.islnk():
                    links.append(member.name)
                    continue
                if name is None or not member.isfile():
                    continue
                budget.add(member.size, member.name)
                stream = tar.extractfile(member)
                files[name] = stream.read() if stream is not None else b""
    _warn_links(path, links)
    return files


def _warn_links(path: Path, links: list[str]) -> None:
    """One warning per archive, however many links it holds."""
    if links:
        shown = ", ".join(repr(name) for name in links[:3]) + (f" and {len(links) - 3} more" if len(links) > 3 else "")
        warnings.warn(f"Skipping link {shown} in {path}: links are not followed in archives.", stacklevel=2)


def _zip_files(path: Path) -> dict[str, bytes | Path]:
    files: dict[str, bytes | Path] = {}
    links: list[str] = []
    budget = _Budget(path)
    with _reading(path, "zip"), zipfile.ZipFile(path) as zf:
        infos = zf.infolist()  # the central directory, read whole by ZipFile
        budget.entry(len(infos))
        for info in infos:
            name = _safe_member_name(path, info.filename)
            if stat.S_ISLNK(info.external_attr >> 16):
                links.append(info.filename)
                continue
            if name is None or info.is_dir():
                continue
            budget.add(info.file_size, info.filename)
            files[name] = zf.read(info)  # reads at most file_size bytes, checks the CRC
    _warn_links(path, links)
    return files


def _strip_wrapper(tree: _Tree) -> _Tree:
    """Drop a single top-level folder that wraps everything (``cifar-100-python/...``)."""
    tops = {name.split("/", 1)[0] for name in tree.files}
    if len(tops) != 1 or not all("/" in name for name in tree.files):
        return tree
    top = tops.pop()
    files = {name[len(top) + 1 :]: value for name, value in tree.files.items()}
    return _Tree(tree.origin, files, prefix=f"{tree.prefix}{top}/")


def _stem(path: Path) -> str:
    name = path.name
    for suffix in ARCHIVE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name
