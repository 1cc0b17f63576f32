"""Tests for cifarlab.data against real files, archives, processes and an HTTP server."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import pickle
import shutil
import struct
import tarfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED_DATA_DIR
from http_server import PAYLOAD, PAYLOAD_MD5, RangeServer, url_of
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from cifarlab import data
from cifarlab.data import Dataset, download, get_split, imagefolder, load_dataset, split_indices, split_info
from cifarlab.errors import ChecksumError, DataError, InputError

# --------------------------------------------------------------------------- #
# Fake official CIFAR archives, written the way the published files are
# --------------------------------------------------------------------------- #


class _Py2Pickler(pickle._Pickler):
    """Writes every str/bytes as a Python 2 ``str`` (BINSTRING), like the cPickle of
    the official files, so that ``encoding="bytes"`` gives bytes keys and names."""

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2_str(self, obj: str | bytes) -> None:
        raw = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str
    dispatch[str] = _save_py2_str


def py2_pickle(obj: object) -> bytes:
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    # Files written by numpy 1.x name numpy.core, not numpy._core.
    return buf.getvalue().replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")


def planar_rows(images: np.ndarray) -> np.ndarray:
    """NHWC -> the official rows: 1024 red, 1024 green, 1024 blue values, each row-major."""
    return np.stack([np.concatenate([img[:, :, c].ravel() for c in range(3)]) for img in images])


def random_images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)


def write_members(folder: Path, members: dict[str, bytes]) -> Path:
    folder.mkdir(parents=True)
    for name, content in members.items():
        (folder / name).write_bytes(content)
    return folder


def tar_gz(src: Path, dest: Path, arcname: str | None = None) -> Path:
    with tarfile.open(dest, "w:gz") as tar:
        tar.add(src, arcname=arcname if arcname is not None else src.name)
    return dest


@dataclasses.dataclass
class FakeCifar:
    folder: Path  # the extracted folder (cifar-100-python/ or cifar-10-batches-py/)
    archive: Path  # a .tar.gz of it, under a name that does not claim to be official
    expected: Dataset


def make_cifar100(root: Path) -> FakeCifar:
    fine_names, coarse_names = ["apple", "bee", "cloud", "dolphin"], ["fruit", "animal", "sky"]
    coarse_of = [0, 1, 2, 1]
    x_train, x_test = random_images(12, 1), random_images(5, 2)
    y_train, y_test = np.arange(12) % 4, np.array([3, 2, 1, 0, 3])
    batch = lambda x, y: {  # noqa: E731
        b"filenames": [b"x.png"] * len(x), b"batch_label": b"training batch 1 of 1",
        b"fine_labels": [int(v) for v in y], b"coarse_labels": [coarse_of[v] for v in y],
        b"data": planar_rows(x),
    }  # fmt: skip
    members = {
        "train": py2_pickle(batch(x_train, y_train)),
        "test": py2_pickle(batch(x_test, y_test)),
        "meta": py2_pickle({b"fine_label_names": [n.encode() for n in fine_names],
                            b"coarse_label_names": [n.encode() for n in coarse_names]}),
    }  # fmt: skip
    folder = write_members(root / "cifar-100-python", members)
    expected = Dataset(
        "cifar100", x_train, y_train, x_test, y_test, fine_names, coarse_names,
        np.array(coarse_of)[y_train], np.array(coarse_of)[y_test],
    )  # fmt: skip
    return FakeCifar(folder, tar_gz(folder, root / "mini-cifar100.tar.gz"), expected)


def make_cifar10(root: Path) -> FakeCifar:
    names = ["airplane", "automobile", "bird"]
    x_train, x_test = random_images(15, 3), random_images(4, 4)
    y_train, y_test = np.arange(15) % 3, np.array([2, 1, 0, 2])
    batch = lambda x, y: {b"labels": [int(v) for v in y], b"data": planar_rows(x)}  # noqa: E731
    members = {f"data_batch_{i + 1}": py2_pickle(batch(x_train[3 * i : 3 * i + 3], y_train[3 * i : 3 * i + 3]))
               for i in range(5)}  # fmt: skip
    members["test_batch"] = py2_pickle(batch(x_test, y_test))
    members["batches.meta"] = py2_pickle({b"label_names": [n.encode() for n in names], b"num_vis": 3072})
    folder = write_members(root / "cifar-10-batches-py", members)
    expected = Dataset("cifar10", x_train, y_train, x_test, y_test, names)
    return FakeCifar(folder, tar_gz(folder, root / "mini-cifar10.tar.gz"), expected)


def assert_same_data(got: Dataset, want: Dataset) -> None:
    assert got.name == want.name
    assert got.classes == want.classes
    for field in ("train_x", "test_x"):
        arr = getattr(got, field)
        assert arr.dtype == np.uint8 and arr.shape[1:] == (32, 32, 3)
        np.testing.assert_array_equal(arr, getattr(want, field))
    for field in ("train_y", "test_y", "train_y_coarse", "test_y_coarse"):
        if getattr(want, field) is None:
            assert getattr(got, field) is None
        else:
            assert getattr(got, field).dtype == np.int64
            np.testing.assert_array_equal(getattr(got, field), getattr(want, field))
    assert got.coarse_classes == want.coarse_classes


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh HOME and working directory, so searching for local copies finds only ours."""
    home = tmp_path / "home"
    (home / "work").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(home / "work")
    return home


# --------------------------------------------------------------------------- #
# Official format
# --------------------------------------------------------------------------- #


def test_cifar100_archive_gives_nhwc_pixels_labels_and_names(tmp_path: Path, cache: Path) -> None:
    fake = make_cifar100(tmp_path)
    ds = load_dataset(fake.archive, cache_dir=cache, progress=False)
    assert_same_data(ds, fake.expected)
    # One pixel by the published definition: red of row 1, column 2 is data[1*32 + 2].
    row = planar_rows(fake.expected.train_x[:1])[0]
    assert ds.train_x[0, 1, 2, 0] == row[1 * 32 + 2]
    assert ds.train_x[0, 1, 2, 2] == row[2048 + 1 * 32 + 2]
    assert ds.coarse_of_fine == [0, 1, 2, 1]
    assert ds.source == str(fake.archive.resolve())


def test_cifar10_batches_are_concatenated_in_order(tmp_path: Path, cache: Path) -> None:
    fake = make_cifar10(tmp_path)
    ds = load_dataset(fake.archive, cache_dir=cache, progress=False)
    assert_same_data(ds, fake.expected)
    assert ds.coarse_of_fine is None


def test_extracted_folder_loads_like_the_archive(tmp_path: Path, cache: Path) -> None:
    fake = make_cifar10(tmp_path)
    assert_same_data(load_dataset(fake.folder, cache_dir=cache, progress=False), fake.expected)


def test_protocol2_pickles_written_by_python3_load(tmp_path: Path, cache: Path) -> None:
    # Python 3 spells bytes in protocol 2 as _codecs.encode(str, "latin1"); re-saved copies do that.
    fake = make_cifar10(tmp_path)
    for member in fake.folder.iterdir():
        obj = pickle.loads(member.read_bytes(), encoding="bytes")
        member.write_bytes(pickle.dumps(obj, protocol=2))
    assert b"_codecs" in (fake.folder / "test_batch").read_bytes()
    assert_same_data(load_dataset(fake.folder, cache_dir=cache, progress=False), fake.expected)


class _RunsShellCommand:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_would_run_code_is_refused(tmp_path: Path, cache: Path) -> None:
    fake = make_cifar100(tmp_path)
    marker = tmp_path / "pwned"
    (fake.folder / "train").write_bytes(pickle.dumps({b"data": _RunsShellCommand(marker)}, protocol=2))
    archive = tar_gz(fake.folder, tmp_path / "evil.tar.gz")
    with pytest.raises(DataError, match="system"):
        load_dataset(archive, cache_dir=cache, progress=False)
    assert not marker.exists()


def test_official_archive_name_with_wrong_content_fails_md5(tmp_path: Path, cache: Path) -> None:
    fake = make_cifar100(tmp_path)
    claimed = tmp_path / "official" / "cifar-100-python.tar.gz"
    claimed.parent.mkdir()
    shutil.copy(fake.archive, claimed)
    actual_md5 = hashlib.md5(claimed.read_bytes()).hexdigest()
    with pytest.raises(ChecksumError) as err:
        load_dataset(claimed, cache_dir=cache, progress=False)
    for text in (actual_md5, data.OFFICIAL["cifar100"].md5, "--no-verify"):
        assert text in str(err.value)

    assert_same_data(load_dataset(claimed, cache_dir=cache, verify=False, progress=False), fake.expected)
    # The unverified cache entry must not satisfy a later verified load.
    with pytest.raises(ChecksumError):
        load_dataset(claimed, cache_dir=cache, progress=False)


def test_official_folder_name_checks_member_md5(tmp_path: Path, cache: Path) -> None:
    fake = make_cifar100(tmp_path)
    with pytest.raises(ChecksumError, match="16019d7e3df5f24257cddd939b257f8d"):
        load_dataset(fake.folder, cache_dir=cache, progress=False)
    assert_same_data(load_dataset(fake.folder, cache_dir=cache, verify=False, progress=False), fake.expected)
    # A renamed copy does not claim to be the official release, so nothing is checked.
    renamed = fake.folder.rename(tmp_path / "my-cifar100")
    assert_same_data(load_dataset(renamed, cache_dir=cache, progress=False), fake.expected)


# --------------------------------------------------------------------------- #
# Loading by name, and the cache
# --------------------------------------------------------------------------- #


def test_name_finds_keras_copy_then_serves_from_cache(isolated_home: Path, tmp_path: Path, cache: Path) -> None:
    fake = make_cifar10(isolated_home / ".keras" / "datasets")
    ds = load_dataset("CIFAR-10", cache_dir=cache, download=False, progress=False)
    assert_same_data(ds, fake.expected)
    assert ds.source == str(fake.folder.resolve())

    shutil.rmtree(isolated_home / ".keras")  # the second load must not need the source
    # Served from the cache: memory-mapped, read-only, and the source is gone (no clock needed).
    again = load_dataset("cifar10", cache_dir=cache, download=False, progress=False)
    assert isinstance(again.train_x, np.memmap) and not again.train_x.flags.writeable
    assert_same_data(again, fake.expected)
    assert sorted(p.name for p in (cache / "datasets").iterdir()) == ["cifar10"]  # no temp dirs left


def test_name_without_local_copy_or_download_explains_where_it_looked(isolated_home: Path, cache: Path) -> None:
    with pytest.raises(DataError) as err:
        load_dataset("cifar100", cache_dir=cache, download=False, progress=False)
    message = str(err.value)
    assert "--data PATH" in message
    assert str(isolated_home / ".keras" / "datasets" / "cifar-100-python.tar.gz") in message


def test_name_wrong_dataset_at_official_location_is_reported(isolated_home: Path, cache: Path) -> None:
    fake = make_cifar10(isolated_home / "data")
    fake.folder.rename(isolated_home / "data" / "cifar-100-python")
    with pytest.raises(DataError, match="holds cifar10, not cifar100"):
        load_dataset("cifar100", cache_dir=cache, download=False, progress=False)


def test_unknown_name_or_missing_path(tmp_path: Path, cache: Path) -> None:
    with pytest.raises(DataError, match="--data PATH"):
        load_dataset("imagenet", cache_dir=cache)
    with pytest.raises(DataError, match="not a dataset"):
        load_dataset(write_members(tmp_path / "junk", {"readme.txt": b"hi"}), cache_dir=cache)


def test_damaged_cache_is_rebuilt(tmp_path: Path, cache: Path) -> None:
    fake = make_cifar10(tmp_path)
    load_dataset(fake.archive, cache_dir=cache, progress=False)
    (entry,) = (cache / "datasets").iterdir()
    (entry / "train_x.npy").write_bytes(b"garbage")
    assert_same_data(load_dataset(fake.archive, cache_dir=cache, progress=False), fake.expected)


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CIFARLAB_HOME", str(tmp_path / "x"))
    assert data.default_cache_dir() == tmp_path / "x"
    monkeypatch.delenv("CIFARLAB_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert data.default_cache_dir() == tmp_path / ".cache" / "cifarlab"


# --------------------------------------------------------------------------- #
# ImageFolder
# --------------------------------------------------------------------------- #


def save_image(path: Path, img: Image.Image) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def make_image_folder(root: Path) -> Dataset:
    """train/ and test/ with classes created out of order and in several colour modes."""
    rng = np.random.default_rng(7)
    rgb = lambda: rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)  # noqa: E731
    gray = rng.integers(0, 256, (32, 32), dtype=np.uint8)
    rgba = rng.integers(0, 256, (32, 32, 4), dtype=np.uint8)
    palette = rng.integers(0, 256, (256, 3), dtype=np.uint8)
    indices = rng.integers(0, 256, (32, 32), dtype=np.uint8)
    p_img = Image.fromarray(indices, "P")
    p_img.putpalette(palette.ravel().tolist())

    files: dict[str, tuple[Image.Image, np.ndarray]] = {
        "train/cat/0.png": (Image.fromarray(a := rgb()), a),
        "train/cat/1.bmp": (Image.fromarray(b := rgb()), b),
        "train/ant/0.png": (Image.fromarray(gray, "L"), np.repeat(gray[:, :, None], 3, axis=2)),
        "train/ant/1.png": (Image.fromarray(rgba, "RGBA"), rgba[:, :, :3]),
        "train/dog/0.png": (p_img, palette[indices]),
        "test/dog/0.png": (Image.fromarray(c := rgb()), c),
        "test/ant/0.png": (Image.fromarray(d := rgb()), d),
        "test/cat/0.png": (Image.fromarray(e := rgb()), e),
    }
    for name, (img, _) in files.items():
        save_image(root / name, img)
    (root / "train" / "cat" / "notes.txt").write_text("not an image")  # ignored, like torchvision

    classes = ["ant", "cat", "dog"]
    arrays = []
    for split in ("train", "test"):
        names = sorted(n for n in files if n.startswith(f"{split}/"))  # by class, then file name
        arrays.append(np.stack([files[n][1] for n in names]))
        arrays.append(np.array([classes.index(n.split("/")[1]) for n in names]))
    return Dataset(root.name, *arrays, classes=classes)


def as_zip(folder: Path, dest: Path) -> Path:
    with zipfile.ZipFile(dest, "w") as zf:
        for path in sorted(folder.rglob("*")):
            zf.write(path, path.relative_to(folder).as_posix())
    return dest


@pytest.mark.parametrize("kind", ["folder", "tar.gz wrapped in a folder", "zip"])
def test_image_folder_round_trips_pixels(tmp_path: Path, cache: Path, kind: str) -> None:
    expected = make_image_folder(tmp_path / "tiny-images")
    if kind == "folder":
        spec = tmp_path / "tiny-images"
    elif kind == "zip":
        spec = as_zip(tmp_path / "tiny-images", tmp_path / "tiny-images.zip")
    else:
        spec = tar_gz(tmp_path / "tiny-images", tmp_path / "tiny-images.tar.gz", arcname="wrapper")
    ds = load_dataset(spec, cache_dir=cache, progress=False)
    assert_same_data(ds, expected)
    assert ds.classes == ["ant", "cat", "dog"]


def test_image_folder_parallel_decode_matches(tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    expected = make_image_folder(tmp_path / "tiny-images")
    monkeypatch.setattr(imagefolder, "_PARALLEL_MIN_IMAGES", 2)
    monkeypatch.setattr(imagefolder, "_DECODE_CHUNK", 2)
    assert_same_data(load_dataset(tmp_path / "tiny-images", cache_dir=cache, progress=False), expected)

    save_image(tmp_path / "tiny-images" / "train" / "dog" / "1.png", Image.new("RGB", (33, 32)))
    with pytest.raises(DataError, match="1.png is 33x32"):  # an error in a worker reaches the caller
        load_dataset(tmp_path / "tiny-images", cache_dir=cache, progress=False)


def test_wrong_size_needs_resize(tmp_path: Path, cache: Path) -> None:
    root = tmp_path / "big"
    make_image_folder(root)
    save_image(root / "train" / "dog" / "big.png", Image.new("RGB", (40, 40), (10, 200, 30)))
    with pytest.raises(DataError) as err:
        load_dataset(root, cache_dir=cache, progress=False)
    assert "big.png" in str(err.value) and "40x40" in str(err.value) and "--resize" in str(err.value)

    ds = load_dataset(root, cache_dir=cache, resize=True, progress=False)
    assert ds.train_x.shape == (6, 32, 32, 3)
    np.testing.assert_array_equal(ds.train_x[-1], np.full((32, 32, 3), (10, 200, 30), dtype=np.uint8))


def test_broken_image_is_named(tmp_path: Path, cache: Path) -> None:
    root = tmp_path / "broken"
    make_image_folder(root)
    (root / "test" / "cat" / "bad.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match=r"bad\.png"):
        load_dataset(root, cache_dir=cache, progress=False)
    archive = tar_gz(root, tmp_path / "broken.tar.gz")
    with pytest.raises(DataError, match=r"broken\.tar\.gz \(member broken/test/cat/bad\.png\)"):
        load_dataset(archive, cache_dir=cache, progress=False)


def test_test_split_must_have_the_train_classes(tmp_path: Path, cache: Path) -> None:
    root = tmp_path / "uneven"
    make_image_folder(root)
    shutil.rmtree(root / "test" / "dog")
    with pytest.raises(DataError, match=r"Only in train/: \['dog'\]"):
        load_dataset(root, cache_dir=cache, progress=False)


def tar_with_member(dest: Path, member: tarfile.TarInfo, content: bytes = b"x") -> Path:
    images = dest.parent / "src-images"
    make_image_folder(images)
    with tarfile.open(dest, "w:gz") as tar:
        tar.add(images, arcname=".")
        tar.addfile(member, io.BytesIO(content) if member.isfile() else None)
    return dest


@pytest.mark.parametrize("name", ["../evil", "/etc/evil", "train/../../evil"])
def test_archive_member_escaping_the_root_is_refused(tmp_path: Path, cache: Path, name: str) -> None:
    member = tarfile.TarInfo(name)
    member.size = 1
    archive = tar_with_member(tmp_path / "evil.tar.gz", member)
    with pytest.raises(DataError, match="unsafe member"):
        load_dataset(archive, cache_dir=cache, progress=False)
    assert not (tmp_path / "evil").exists()


def test_archive_links_are_skipped(tmp_path: Path, cache: Path) -> None:
    link = tarfile.TarInfo("train/cat/link.png")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    archive = tar_with_member(tmp_path / "links.tar.gz", link)
    with pytest.warns(UserWarning, match="Skipping link"):
        ds = load_dataset(archive, cache_dir=cache, progress=False)
    assert len(ds.train_x) == 5


# --------------------------------------------------------------------------- #
# download()
# --------------------------------------------------------------------------- #



def test_download_complete_file(server: RangeServer, tmp_path: Path) -> None:
    server.files["/f.tar.gz"] = PAYLOAD
    dest = download(url_of(server, "/f.tar.gz"), tmp_path / "d" / "f.tar.gz", PAYLOAD_MD5, progress=False)
    assert dest == tmp_path / "d" / "f.tar.gz" and dest.read_bytes() == PAYLOAD
    assert not (tmp_path / "d" / "f.tar.gz.part").exists()
    assert server.ranges == [None]


def test_download_resumes_partial_file(server: RangeServer, tmp_path: Path) -> None:
    server.files["/f.tar.gz"] = PAYLOAD
    (tmp_path / "f.tar.gz.part").write_bytes(PAYLOAD[:1_000_000])
    dest = download(url_of(server, "/f.tar.gz"), tmp_path / "f.tar.gz", PAYLOAD_MD5, progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert server.ranges == ["bytes=1000000-"]
    assert server.bytes_sent == len(PAYLOAD) - 1_000_000


def test_download_starts_over_when_server_ignores_range(server: RangeServer, tmp_path: Path) -> None:
    server.files["/f.tar.gz"], server.honor_range = PAYLOAD, False
    (tmp_path / "f.tar.gz.part").write_bytes(b"stale bytes")
    dest = download(url_of(server, "/f.tar.gz"), tmp_path / "f.tar.gz", PAYLOAD_MD5, progress=False)
    assert dest.read_bytes() == PAYLOAD


def test_download_wrong_md5_leaves_nothing(server: RangeServer, tmp_path: Path) -> None:
    server.files["/f.tar.gz"] = PAYLOAD
    with pytest.raises(ChecksumError, match=PAYLOAD_MD5):
        download(url_of(server, "/f.tar.gz"), tmp_path / "f.tar.gz", "0" * 32, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_download_errors_suggest_manual_download(server: RangeServer, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"404.*--data PATH"):
        download(url_of(server, "/missing"), tmp_path / "f", None, progress=False)
    unused_port = server.server_address[1]
    server.shutdown()
    server.server_close()
    with pytest.raises(DataError, match=rf"127\.0\.0\.1:{unused_port}/f.*--data PATH"):
        download(f"http://127.0.0.1:{unused_port}/f", tmp_path / "f", None, progress=False)


def test_name_downloads_official_archive(
    server: RangeServer, isolated_home: Path, tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = make_cifar10(tmp_path)
    body = fake.archive.read_bytes()
    server.files["/cifar-10-python.tar.gz"] = body
    official = dataclasses.replace(
        data.OFFICIAL["cifar10"], url=url_of(server, "/cifar-10-python.tar.gz"), md5=hashlib.md5(body).hexdigest()
    )
    monkeypatch.setitem(data.OFFICIAL, "cifar10", official)
    ds = load_dataset("cifar10", cache_dir=cache, progress=False)
    assert_same_data(ds, fake.expected)
    assert (cache / "cifar-10-python.tar.gz").read_bytes() == body


# --------------------------------------------------------------------------- #
# Splits
# --------------------------------------------------------------------------- #

LABELS = np.repeat(np.arange(3), [10, 25, 7])


def test_split_is_stratified_and_exact() -> None:
    train, val = split_indices(LABELS, 0.2, seed=0)
    assert np.bincount(LABELS[val]).tolist() == [2, 5, 1]  # round(2.0), round(5.0), round(1.4)
    assert train.dtype == val.dtype == np.int64
    assert np.all(np.diff(train) > 0) and np.all(np.diff(val) > 0)
    np.testing.assert_array_equal(np.sort(np.concatenate([train, val])), np.arange(len(LABELS)))


def test_split_depends_only_on_seed() -> None:
    first, again, other = (split_indices(LABELS, 0.3, seed=s)[1] for s in (1, 1, 2))
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_split_fraction_bounds() -> None:
    train, val = split_indices(LABELS, 0.0)
    assert len(val) == 0 and len(train) == len(LABELS)
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(InputError, match="val_fraction"):
            split_indices(LABELS, bad)


@settings(max_examples=40, deadline=None)
@given(
    labels=st.lists(st.integers(0, 5), min_size=1, max_size=200),
    fraction=st.floats(0, 0.95),
    seed=st.integers(0, 2**32 - 1),
)
def test_split_counts_property(labels: list[int], fraction: float, seed: int) -> None:
    y = np.array(labels)
    train, val = split_indices(y, fraction, seed)
    assert len(np.intersect1d(train, val)) == 0 and len(train) + len(val) == len(y)
    for c in np.unique(y):
        assert np.sum(y[val] == c) == round(np.sum(y == c) * fraction)


def test_get_split_and_split_info(tmp_path: Path, cache: Path) -> None:
    ds = load_dataset(make_cifar10(tmp_path).archive, cache_dir=cache, progress=False)
    x_tr, y_tr = get_split(ds, "train", 0.2, seed=3)
    x_val, y_val = get_split(ds, "val", 0.2, seed=3)
    x_te, y_te = get_split(ds, "test", 0.2, seed=3)
    assert (len(x_tr), len(x_val), len(x_te)) == (12, 3, 4)
    assert x_tr.dtype == np.uint8 and y_tr.dtype == y_val.dtype == y_te.dtype == np.int64
    _, val_idx = split_indices(ds.train_y, 0.2, seed=3)
    np.testing.assert_array_equal(x_val, ds.train_x[val_idx])
    with pytest.raises(InputError, match="'train', 'val' or 'test'"):
        get_split(ds, "all-train")

    info = split_info(ds, 0.2, 3)
    assert info == {
        "method": "stratified", "seed": 3, "val_fraction": 0.2, "n_train": 12, "n_val": 3,
        "val_indices_sha256": hashlib.sha256(val_idx.astype("<i8").tobytes()).hexdigest(),
    }  # fmt: skip
    assert split_info(ds, 0.2, 3) == info and split_info(ds, 0.2, 4) != info


# --------------------------------------------------------------------------- #
# Real data
# --------------------------------------------------------------------------- #


@pytest.mark.slow
def test_real_cifar10_jpeg(tmp_path: Path) -> None:
    archive = SHARED_DATA_DIR / "cifar10-jpeg.tar.gz"
    if not archive.is_file():
        pytest.skip(f"{archive} is absent")
    start = time.perf_counter()
    ds = load_dataset(archive, cache_dir=tmp_path, progress=False)
    print(f"\nfirst load (decode 60,000 JPEGs + cache): {time.perf_counter() - start:.1f} s")

    assert ds.name == "cifar10-jpeg"
    assert ds.train_x.shape == (50_000, 32, 32, 3) and ds.test_x.shape == (10_000, 32, 32, 3)
    assert ds.classes == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    assert np.bincount(ds.train_y).tolist() == [5000] * 10
    assert np.bincount(ds.test_y).tolist() == [1000] * 10
    mean = ds.test_x.reshape(-1, 3).mean(axis=0) / 255
    np.testing.assert_allclose(mean, [0.494, 0.485, 0.450], atol=0.01)

    start = time.perf_counter()
    again = load_dataset(archive, cache_dir=tmp_path, progress=False)
    elapsed = time.perf_counter() - start
    print(f"load from cache: {elapsed * 1000:.1f} ms")
    assert elapsed < 1.0 and isinstance(again.train_x, np.memmap)


@pytest.mark.slow
def test_cifar10_jpeg_fixture(cifar10_jpeg: Dataset) -> None:
    # Other test files rely on this session fixture from conftest.py.
    assert cifar10_jpeg.name == "cifar10-jpeg" and len(cifar10_jpeg.classes) == 10
    x, y = get_split(cifar10_jpeg, "val", 0.1, seed=0)
    assert x.shape == (5000, 32, 32, 3) and np.bincount(y).tolist() == [500] * 10


def sixteen_bit_png(path: Path, levels: np.ndarray) -> None:
    """A real 16-bit grayscale PNG (Pillow mode I;16) with these 0..65535 levels."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(levels.astype(np.uint16)).save(path)
    assert Image.open(path).mode == "I;16"


def test_16_bit_pngs_are_scaled_to_8_bits_not_clipped_white(tmp_path: Path, cache: Path) -> None:
    levels = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    for split in ("train", "test"):
        for cls in ("a", "b"):
            sixteen_bit_png(tmp_path / "deep" / split / cls / "0.png", levels)
    ds = load_dataset(tmp_path / "deep", cache_dir=cache, progress=False)
    pixels = ds.train_x[0]
    expected = np.round(levels / 257).astype(np.uint8)
    np.testing.assert_array_equal(pixels[..., 0], expected)  # 65535 -> 255, 32768 -> 128, 0 -> 0
    assert pixels.mean() == pytest.approx(127.5, abs=0.5)  # not 255: the clipping this replaced


def test_deep_image_files_given_to_predict_are_scaled_or_refused(tmp_path: Path) -> None:
    from cifarlab.predict import read_image

    levels = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    sixteen_bit_png(tmp_path / "deep.png", levels)
    np.testing.assert_array_equal(read_image(tmp_path / "deep.png", (32, 32))[..., 1], np.round(levels / 257))
    Image.fromarray(np.full((32, 32), 0.5, np.float32), "F").save(tmp_path / "float.tif")
    with pytest.raises(InputError, match="float.tif: it has floating-point pixels, whose range the file does not"):
        read_image(tmp_path / "float.tif", (32, 32))
