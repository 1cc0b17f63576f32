"""Malicious and broken dataset archives and image files: each is refused with a DataError that
names the file, nothing is written outside the cache, and no link is ever followed.

The set: ../ traversal, absolute paths, symbolic links out of the archive (file and folder),
hard links, a member declaring 3 GiB, a real gzip and zip bomb, a pax-header bomb, too many
members, a negative size, a zip whose declared size lies, an encrypted member, an unsupported
compression method; image files that are corrupt, EPS in disguise, or a pixel bomb.
Limits are lowered for the bomb tests (module constants, read at use) so they run in
milliseconds; a separate test checks the real limits on a declared size.
"""

from __future__ import annotations

import io
import os
import stat
import tarfile
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from synthetic import EPS, IMAGES, PNG, pixel_bomb_png

from cifarlab.data import archives, load_dataset
from cifarlab.data.imagefolder import _decode_one
from cifarlab.errors import CifarlabError, DataError, ImageDecodeError


def make_tar(path: Path, extra: list[tuple[tarfile.TarInfo, bytes | None]], *, compress: str = "gz",
             fmt: int = tarfile.PAX_FORMAT) -> Path:
    """A valid ImageFolder tar plus the `extra` members, written as given (no sanitising)."""
    with tarfile.open(path, f"w:{compress}" if compress else "w", format=fmt) as tar:
        for name, data in IMAGES.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info, data in extra:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def tar_member(name: str, data: bytes = b"x", **attrs) -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for key, value in attrs.items():
        setattr(info, key, value)
    return info, (data if info.isfile() else None)


def make_zip(path: Path, extra: list[tuple[zipfile.ZipInfo | str, bytes]],
             compression: int = zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", compression) as zf:
        for name, data in IMAGES.items():
            zf.writestr(name, data)
        for info, data in extra:
            zf.writestr(info, data)
    return path


def zip_symlink(name: str, target: str) -> tuple[zipfile.ZipInfo, bytes]:
    info = zipfile.ZipInfo(name)
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info, target.encode()


def patch_zip_declared_size(path: Path, member: str, size: int) -> None:
    """Rewrite the uncompressed size the central directory declares for `member`."""
    data = bytearray(path.read_bytes())
    entry = data.index(b"PK\x01\x02")  # the first central-directory entry
    name = member.encode()
    while True:
        name_len = int.from_bytes(data[entry + 28:entry + 30], "little")
        if bytes(data[entry + 46:entry + 46 + name_len]) == name:
            data[entry + 24:entry + 28] = size.to_bytes(4, "little")
            break
        entry = data.index(b"PK\x01\x02", entry + 4)
    path.write_bytes(bytes(data))


def load(path: Path, cache: Path, **kwargs):
    return load_dataset(path, cache_dir=cache, progress=False, **kwargs)


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def assert_nothing_outside(tmp_path: Path, archive: Path) -> None:
    """Only the archive and the cache folder exist: no member was extracted anywhere."""
    assert {p.name for p in tmp_path.iterdir()} <= {archive.name, "cache"}
    assert not Path("/tmp/evil").exists() and not Path("/evil").exists()


# ---- traversal ------------------------------------------------------------------------------

TRAVERSAL = ["../evil", "/etc/evil", "train/../../evil", "train/cat/../../../evil", "\\..\\evil"]


@pytest.mark.parametrize("name", TRAVERSAL)
@pytest.mark.parametrize("kind", ["tar.gz", "zip"])
def test_traversal_and_absolute_members_are_refused(tmp_path: Path, cache: Path, name: str, kind: str) -> None:
    if kind == "zip":
        archive = make_zip(tmp_path / "evil.zip", [(name, b"x")])
    else:
        archive = make_tar(tmp_path / "evil.tar.gz", [tar_member(name)])
    with pytest.raises(DataError, match="unsafe member"):
        load(archive, cache)
    assert_nothing_outside(tmp_path, archive)


# ---- links ----------------------------------------------------------------------------------

@pytest.mark.parametrize("member", [
    tar_member("train/cat/passwd.png", b"", type=tarfile.SYMTYPE, linkname="/etc/passwd"),
    tar_member("train/cat/up.png", b"", type=tarfile.SYMTYPE, linkname="../../../../outside.png"),
    tar_member("train/cat/hard.png", b"", type=tarfile.LNKTYPE, linkname="/etc/passwd"),
    tar_member("train/cat/hard2.png", b"", type=tarfile.LNKTYPE, linkname="train/cat/0.png"),
], ids=["symlink-absolute", "symlink-up", "hardlink-absolute", "hardlink-inside"])
def test_tar_links_are_skipped_never_followed(tmp_path: Path, cache: Path, member) -> None:
    archive = make_tar(tmp_path / "links.tar.gz", [member])
    with pytest.warns(UserWarning, match="Skipping link"):
        ds = load(archive, cache)
    assert len(ds.train_x) == 2 and len(ds.test_x) == 2  # only the real images
    assert_nothing_outside(tmp_path, archive)


def test_tar_symlinked_folder_does_not_redirect_later_members(tmp_path: Path, cache: Path) -> None:
    # "train/bird" -> /etc, then "train/bird/0.png": an extractor would write through the link;
    # we read the member's own bytes, so the image is the one in the archive.
    archive = make_tar(tmp_path / "dirlink.tar.gz", [
        tar_member("train/bird", b"", type=tarfile.SYMTYPE, linkname="/etc"),
        tar_member("train/bird/0.png", PNG), tar_member("test/bird/0.png", PNG)])
    with pytest.warns(UserWarning, match="Skipping link"):
        ds = load(archive, cache)
    assert ds.classes == ["bird", "cat", "dog"]
    np.testing.assert_array_equal(ds.train_x[0], np.full((32, 32, 3), (9, 99, 199), np.uint8))


def test_zip_symlinks_are_skipped(tmp_path: Path, cache: Path) -> None:
    archive = make_zip(tmp_path / "links.zip", [zip_symlink("train/cat/passwd.png", "/etc/passwd")])
    with pytest.warns(UserWarning, match="Skipping link"):
        ds = load(archive, cache)
    assert len(ds.train_x) == 2


# ---- sizes, bombs and counts ------------------------------------------------------------------

def test_tar_member_declaring_3_gib_is_refused_before_reading(tmp_path: Path, cache: Path) -> None:
    # The real limits; the archive holds only the header, so reading would fail differently.
    header = tarfile.TarInfo("train/cat/huge.png")
    header.size = 3 * 1024**3
    archive = tmp_path / "huge.tar"
    make_tar(archive, [], compress="")
    body = archive.read_bytes().rstrip(b"\0")
    archive.write_bytes(body + b"\0" * (-len(body) % 512) + header.tobuf() + b"\0" * 1024)
    with pytest.raises(DataError, match="expands to more than 2 GiB"):
        load(archive, cache)


def test_zip_member_declaring_3_gib_is_refused_before_reading(tmp_path: Path, cache: Path) -> None:
    archive = make_zip(tmp_path / "huge.zip", [("train/cat/huge.png", b"x" * 100)])
    patch_zip_declared_size(archive, "train/cat/huge.png", 3 * 1024**3)
    with pytest.raises(DataError, match="expands to more than 2 GiB"):
        load(archive, cache)


@pytest.fixture
def small_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Bomb limits scaled down 256x, so a 4 MiB bomb shows what a 1 GiB one would."""
    monkeypatch.setattr(archives, "BOMB_FLOOR_BYTES", 1024**2)
    monkeypatch.setattr(archives, "MAX_ARCHIVE_MEMBERS", 40)


def test_gzip_bomb_is_refused(tmp_path: Path, cache: Path, small_limits) -> None:
    archive = make_tar(tmp_path / "bomb.tar.gz", [tar_member("train/cat/zeros.png", bytes(4 * 1024**2))])
    assert archive.stat().st_size < 20_000  # 4 MiB of zeros: ~1000x
    with pytest.raises(DataError, match="decompression bomb"):
        load(archive, cache)


def test_zip_bomb_is_refused(tmp_path: Path, cache: Path, small_limits) -> None:
    archive = make_zip(tmp_path / "bomb.zip", [(f"train/cat/z{i}.png", bytes(1024**2)) for i in range(4)])
    with pytest.raises(DataError, match="decompression bomb"):
        load(archive, cache)


def test_pax_header_bomb_is_refused_by_the_decompressed_byte_count(tmp_path: Path, cache: Path,
                                                                   small_limits) -> None:
    # tarfile reads a pax header whole before yielding its member: only counting the
    # decompressed bytes catches it.
    info, data = tar_member("train/cat/1.png", PNG)
    info.pax_headers = {"comment": "x" * (4 * 1024**2)}
    archive = make_tar(tmp_path / "pax.tar.gz", [(info, data)])
    with pytest.raises(DataError, match="decompression bomb"):
        load(archive, cache)


@pytest.mark.parametrize("kind", ["tar.gz", "zip"])
def test_too_many_members_counting_folders_and_links(tmp_path: Path, cache: Path, small_limits, kind) -> None:
    if kind == "zip":
        archive = make_zip(tmp_path / "many.zip", [(f"train/cat/d{i}/", b"") for i in range(50)])
    else:
        archive = make_tar(tmp_path / "many.tar.gz", [
            tar_member(f"train/cat/l{i}", b"", type=tarfile.SYMTYPE, linkname="0.png") for i in range(50)])
    with pytest.raises(DataError, match="more than 40 entries"):
        load(archive, cache)


def test_tar_member_with_negative_size_is_refused(tmp_path: Path, cache: Path) -> None:
    info = tarfile.TarInfo("train/cat/neg.png")
    info.size = -(2**40)  # base-256 in a GNU header; would lower the byte count
    archive = tmp_path / "neg.tar"
    make_tar(archive, [], compress="", fmt=tarfile.GNU_FORMAT)
    body = archive.read_bytes().rstrip(b"\0")
    archive.write_bytes(body + b"\0" * (-len(body) % 512) + info.tobuf(format=tarfile.GNU_FORMAT) + b"\0" * 1024)
    with pytest.raises(DataError, match="negative size"):
        load(archive, cache)


def test_zip_whose_declared_size_lies_is_refused(tmp_path: Path, cache: Path) -> None:
    archive = make_zip(tmp_path / "lies.zip", [("train/cat/big.png", b"y" * 50_000)])
    patch_zip_declared_size(archive, "train/cat/big.png", 10)  # reads 10 bytes; the CRC then fails
    with pytest.raises(DataError, match="Could not read the zip archive"):
        load(archive, cache)


def test_encrypted_and_unsupported_zip_members_are_refused(tmp_path: Path, cache: Path) -> None:
    archive = make_zip(tmp_path / "enc.zip", [("train/cat/1.png", PNG)])
    data = bytearray(archive.read_bytes())
    for signature, flag_at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):  # set "encrypted" everywhere
        at = data.find(signature)
        while at >= 0:
            data[at + flag_at] |= 1
            at = data.find(signature, at + 4)
    archive.write_bytes(bytes(data))
    with pytest.raises(DataError, match="encrypted"):
        load(archive, cache)
    weird = make_zip(tmp_path / "weird.zip", [("train/cat/1.png", PNG)])
    data = bytearray(weird.read_bytes())
    for signature, method_at in ((b"PK\x03\x04", 8), (b"PK\x01\x02", 10)):
        at = data.find(signature)
        while at >= 0:
            data[at + method_at:at + method_at + 2] = (97).to_bytes(2, "little")  # no such method
            at = data.find(signature, at + 4)
    weird.write_bytes(bytes(data))
    with pytest.raises(DataError, match="Could not read the zip archive"):
        load(weird, cache)


def test_truncated_archives_say_so(tmp_path: Path, cache: Path) -> None:
    for name in ("cut.tar.gz", "cut.zip"):
        whole = (make_tar if name.endswith("gz") else make_zip)(tmp_path / f"whole-{name}", [])
        cut = tmp_path / name
        cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
        with pytest.raises(DataError, match=r"Could not read|neither a folder"):
            load(cut, cache)


# ---- image files ------------------------------------------------------------------------------



@pytest.mark.parametrize("data,reason", [
    (b"\x89PNG\r\n\x1a\n not really", "cannot identify|UnidentifiedImageError"),
    (PNG[: len(PNG) // 2], "truncated|broken|OSError|SyntaxError"),
    (EPS, "cannot identify|UnidentifiedImageError"),  # EPS would run Ghostscript: not an allowed format
    (pixel_bomb_png(), "decompression bomb"),
    (b"", "cannot identify|UnidentifiedImageError"),
], ids=["garbage", "truncated", "eps", "pixel-bomb", "empty"])
def test_undecodable_images_name_the_file_and_the_reason(data: bytes, reason: str) -> None:
    with pytest.raises(ImageDecodeError, match=reason) as err:
        _decode_one("train/cat/x.png", data, resize=True)
    assert "train/cat/x.png" in str(err.value) and "--bad-images skip" in str(err.value)


def image_folder_with_bad_files(root: Path) -> list[str]:
    for name, data in IMAGES.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    bad = {"train/cat/broken.png": PNG[:40], "train/dog/eps.png": EPS, "test/dog/bomb.png": pixel_bomb_png()}
    for name, data in bad.items():
        (root / name).write_bytes(data)
    return sorted(bad)


def test_bad_images_refuse_by_default_skip_with_a_list(tmp_path: Path, cache: Path) -> None:
    root = tmp_path / "photos"
    bad = image_folder_with_bad_files(root)
    with pytest.raises(ImageDecodeError, match="broken.png"):
        load(root, cache)
    with pytest.warns(UserWarning, match="3 images of photos could not be decoded and were left out"):
        ds = load(root, cache, bad_images="skip")
    assert (len(ds.train_x), len(ds.train_y), len(ds.test_x), len(ds.test_y)) == (2, 2, 2, 2)
    assert sorted(s.split(str(root) + "/")[1].split(":")[0] for s in ds.skipped) == bad
    # The cache remembers the choice and the list; a later load warns again.
    with pytest.warns(UserWarning, match="left out"):
        again = load(root, cache)
    assert again.skipped == ds.skipped


def test_bad_images_in_an_archive_are_listed_by_member(tmp_path: Path, cache: Path) -> None:
    archive = make_tar(tmp_path / "bad.tar.gz", [tar_member("train/cat/broken.png", PNG[:40])])
    with pytest.warns(UserWarning, match="left out"):
        ds = load(archive, cache, bad_images="skip")
    assert ds.skipped and "bad.tar.gz (member train/cat/broken.png)" in ds.skipped[0]


def test_a_split_with_no_decodable_image_is_refused(tmp_path: Path, cache: Path) -> None:
    root = tmp_path / "allbad"
    for name in IMAGES:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(PNG if name.startswith("train") else b"junk")
    with pytest.raises(DataError, match="none of the 2 images in test/ could be decoded"):
        load(root, cache, bad_images="skip")


def test_bad_images_policy_is_validated(tmp_path: Path, cache: Path) -> None:
    with pytest.raises(CifarlabError, match="'refuse' or 'skip'"):
        load(tmp_path, cache, bad_images="ignore")


# ---- pickles that would exhaust memory without running any code ------------------------------------

def cifar10_archive(path: Path, batch: bytes, member: str = "data_batch_1") -> Path:
    """An official-format CIFAR-10 tar.gz whose `member` (the first training batch) is `batch`."""
    from fuzz_importers import _cifar10_members

    members = {**_cifar10_members(), f"cifar-10-batches-py/{member}": batch}
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _with_member(path: Path, member: str, obj: object) -> Path:
    """The small official-format CIFAR-10 archive with one member replaced by a pickle of `obj`."""
    from fuzz_importers import _py2_pickle

    return cifar10_archive(path, _py2_pickle(obj), member)


PIXELS = np.zeros((2, 3072), np.uint8)


@pytest.mark.parametrize("member,obj,message", [
    ("data_batch_1", {b"labels": [0.0, 1.7], b"data": PIXELS}, "'labels' should be integer class ids, got float64"),
    ("data_batch_1", {b"labels": ["a", "b"], b"data": PIXELS}, "'labels' should be integer class ids"),
    ("data_batch_1", {b"labels": [0, 5], b"data": PIXELS}, "'labels' should be 2 ids in [0, 3)"),
    ("batches.meta", {b"label_names": 3}, "'label_names' should be a list of 2..10,000 class names"),
    ("batches.meta", {b"label_names": b"abc"}, "'label_names' should be a list"),
    ("batches.meta", {b"label_names": [b"a", 2, b"c"]}, "'label_names' should be a list"),
    ("batches.meta", {b"label_names": [b"a", b"\xff\xfe", b"c"]}, "is not UTF-8"),
])
def test_official_pickle_fields_of_the_wrong_type_are_refused(tmp_path: Path, cache: Path, member: str, obj,
                                                              message: str) -> None:
    with pytest.raises(DataError) as info:
        load(_with_member(tmp_path / "c10.tar.gz", member, obj), cache, verify=False)
    assert message in str(info.value)


def test_integral_float_labels_are_read_as_ids(tmp_path: Path, cache: Path) -> None:
    ds = load(_with_member(tmp_path / "c10.tar.gz", "data_batch_1", {b"labels": [2.0, 1.0], b"data": PIXELS}),
              cache, verify=False)
    assert ds.train_y[:2].tolist() == [2, 1] and ds.train_y.dtype == np.int64


def test_pickle_memo_bomb_is_refused(tmp_path: Path, cache: Path) -> None:
    # Found by the fuzzer: one LONG_BINPUT with index 1.26e9 made the unpickler's memo 10 GB.
    bomb = b"\x80\x02}r" + (1_260_918_385).to_bytes(4, "little") + b"."
    with pytest.raises(DataError, match="is not a CIFAR pickle"):
        load(cifar10_archive(tmp_path / "memo.tar.gz", bomb), cache)


def test_pickle_of_millions_of_objects_is_refused(tmp_path: Path, cache: Path, monkeypatch) -> None:
    from cifarlab.data import cifar

    monkeypatch.setattr(cifar, "MAX_PICKLE_OPS", 1000)  # scaled down from 4 million
    bomb = b"\x80\x02(" + b"}" * 5000 + b"l."  # a list of 5000 empty dicts
    with pytest.raises(DataError, match="more than 1,000 opcodes"):
        load(cifar10_archive(tmp_path / "many.tar.gz", bomb), cache)


# ---- dataset folders: only regular files are read ----------------------------------------------

def _load_in_thread(root: Path, cache: Path, seconds: float = 60) -> BaseException | None:
    """load_dataset in a daemon thread: a read that blocked forever would fail the test, not hang it."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            load(root, cache)
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome.append(exc)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(seconds)
    assert outcome, "load_dataset did not return: it blocked on a file it should not have opened"
    return outcome[0]


@pytest.mark.parametrize("kind", ["fifo", "link-to-dev-zero"])
def test_a_folder_never_opens_fifos_or_devices(tmp_path: Path, cache: Path, kind: str) -> None:
    root = tmp_path / "folder"
    for name in IMAGES:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(PNG)
    odd = root / "train" / "cat" / "1.png"
    if kind == "fifo":
        os.mkfifo(odd)  # opening it for reading would wait for a writer forever
    else:
        odd.symlink_to("/dev/zero")  # reading it would never end
    error = _load_in_thread(root, cache)
    assert isinstance(error, DataError) and "is not a regular file" in str(error) and "1.png" in str(error)


def test_a_folder_file_beyond_the_size_cap_is_refused(tmp_path: Path, cache: Path, monkeypatch) -> None:
    monkeypatch.setattr(archives, "MAX_FILE_BYTES", 1000)
    root = tmp_path / "folder"
    for name in IMAGES:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(PNG)
    (root / "train" / "cat" / "big.png").write_bytes(PNG + bytes(2000))
    with pytest.raises(DataError, match="big.png holds 2,[0-9]+ bytes; files in a dataset folder are read up to 1,000"):
        load(root, cache)


def test_a_folder_without_test_says_test_is_missing(tmp_path: Path, cache: Path) -> None:
    for cls in ("cat", "dog"):
        (tmp_path / "data" / "train" / cls).mkdir(parents=True)
        Image.new("RGB", (32, 32)).save(tmp_path / "data" / "train" / cls / "0.png")
    with pytest.raises(DataError, match=r"has train/ but no test/: an ImageFolder dataset needs both"):
        load(tmp_path / "data", cache)


def test_class_names_are_printed_with_control_characters_escaped(tmp_path: Path, cache: Path) -> None:
    hostile = "ca\x1b[31mt"  # a folder named with a terminal escape sequence
    for split in ("train", "test"):
        for cls in (hostile, "dog"):
            (tmp_path / "data" / split / cls).mkdir(parents=True)
            Image.new("RGB", (32, 32)).save(tmp_path / "data" / split / cls / "0.png")
    ds = load(tmp_path / "data", cache)
    assert ds.classes == ["ca\\x1b[31mt", "dog"] and all(name.isprintable() for name in ds.classes)
    names = load(_with_member(tmp_path / "c10.tar.gz", "batches.meta", {b"label_names": [b"a\x07", b"b", b"c"]}),
                  cache, verify=False).classes
    assert names == ["a\\x07", "b", "c"]
