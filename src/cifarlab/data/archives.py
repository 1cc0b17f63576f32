"""Read a folder, tar or zip into memory, member by member, without extracting anything.

Members that are absolute or contain ``..`` are refused, links are skipped, and an
archive may expand to at most MAX_ARCHIVE_MEMBERS files / MAX_ARCHIVE_BYTES bytes.
"""

from __future__ import annotations

import os
import stat
import tarfile
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from cifarlab.errors import DataError

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")

# Limits on what an archive may expand to. The official CIFAR-100 archive holds
# 3 members / ~180 MB; an ImageFolder copy of CIFAR holds ~60,000 files.
MAX_ARCHIVE_BYTES = 2 * 1024**3
MAX_ARCHIVE_MEMBERS = 1_000_000


@dataclass
class _Tree:
    """Regular files of an archive or folder: relative posix path -> bytes or file."""

    origin: Path
    files: dict[str, bytes | Path]
    prefix: str = ""  # wrapper folder stripped from every name

    def read(self, name: str) -> bytes:
        value = self.files[name]
        return value if isinstance(value, bytes) else value.read_bytes()

    def where(self, name: str) -> str:
        """Where ``name`` is, in words a user can find it by."""
        value = self.files[name]
        return str(value) if isinstance(value, Path) else f"{self.origin} (member {self.prefix}{name})"


def _ignored(parts: tuple[str, ...]) -> bool:
    # macOS archives carry __MACOSX/ and ._* resource forks; editors leave dotfiles.
    return any(p.startswith(".") or p == "__MACOSX" for p in parts)


def _open_tree(path: Path) -> _Tree:
    if path.is_dir():
        tree = _Tree(path, _folder_files(path))
    elif tarfile.is_tarfile(path):
        tree = _Tree(path, _tar_files(path))
    elif zipfile.is_zipfile(path):
        tree = _Tree(path, _zip_files(path))
    else:
        raise DataError(f"{path} is neither a folder nor a tar/tar.gz/zip archive. Pass one of those with --data PATH.")
    return _strip_wrapper(tree)


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
    """Counts members and bytes so a hostile archive cannot exhaust memory."""

    def __init__(self, archive: Path) -> None:
        self.archive, self.members, self.bytes = archive, 0, 0

    def add(self, size: int) -> None:
        self.members += 1
        self.bytes += size
        if self.members > MAX_ARCHIVE_MEMBERS or self.bytes > MAX_ARCHIVE_BYTES:
            raise DataError(
                f"{self.archive} expands to more than {MAX_ARCHIVE_MEMBERS:,} files or "
                f"{MAX_ARCHIVE_BYTES / 1024**3:.0f} GiB; refusing to read it. Extract it yourself "
                "and pass the folder with --data PATH if it is genuine."
            )


def _tar_files(path: Path) -> dict[str, bytes | Path]:
    files: dict[str, bytes | Path] = {}
    budget = _Budget(path)
    try:
        # Streaming mode ("r|*") reads the compressed file once, front to back.
        with tarfile.open(path, "r|*") as tar:
            for member in tar:
                name = _safe_member_name(path, member.name)
                if member.issym() or member.islnk():
                    warnings.warn(f"Skipping link {member.name!r} in {path}: links are not followed in archives.")
                    continue
                if name is None or not member.isfile():
                    continue
                budget.add(member.size)
                stream = tar.extractfile(member)
                files[name] = stream.read() if stream is not None else b""
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise DataError(f"Could not read the tar archive {path}: {e}. Is it complete? Try downloading it again.") from e
    return files


def _zip_files(path: Path) -> dict[str, bytes | Path]:
    files: dict[str, bytes | Path] = {}
    budget = _Budget(path)
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                name = _safe_member_name(path, info.filename)
                if stat.S_ISLNK(info.external_attr >> 16):
                    warnings.warn(f"Skipping link {info.filename!r} in {path}: links are not followed in archives.")
                    continue
                if name is None or info.is_dir():
                    continue
                budget.add(info.file_size)
                files[name] = zf.read(info)  # reads at most file_size bytes, checks the CRC
    except (zipfile.BadZipFile, EOFError, OSError, zlib.error) as e:
        raise DataError(f"Could not read the zip archive {path}: {e}. Is it complete? Try downloading it again.") from e
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
