"""Files that must survive full disks and kills, files that must not be trusted, and commands that
must refuse bad input with exit status 2 and a message (no traceback).

Full disks are real, not mocked: a child process lowers its file-size limit (RLIMIT_FSIZE,
with SIGXFSZ ignored, so write() fails with EFBIG as on a full disk), and where mounting is
allowed (root), a 1 MiB tmpfs gives a genuine ENOSPC.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from http_server import PAYLOAD, PAYLOAD_MD5, url_of
from PIL import Image
from safetensors.torch import save_file
from synthetic import EPS, IMAGES, QUICK, pixel_bomb_png, synthetic_dataset

from cifarlab.cli import main
from cifarlab.errors import CifarlabError, InputError, ModelFileError, StorageError
from cifarlab.fileio import atomic_write
from cifarlab.imageops import resize_images
from cifarlab.modelfile import METADATA_KEY, build_classifier, load_model, make_meta, save_model, validate_images
from cifarlab.predict import read_image
from cifarlab.training import CHECKPOINT_KEY, TrainConfig, read_checkpoint, resume, train

STATS = {"mean": [125.3, 123.0, 113.9], "std": [63.0, 62.1, 66.7], "min": [0, 0, 0], "max": [255, 255, 255]}
SRC = str(Path(__file__).resolve().parents[1] / "src")


def tiny_classifier(num_classes: int = 3):
    torch.manual_seed(0)
    meta = make_meta(architecture="airbench-small", arch_args={}, classes=[f"c{i}" for i in range(num_classes)],
                     train_stats=STATS, dataset={"name": "test"})
    return build_classifier(meta).eval()


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    return save_model(tiny_classifier(), tmp_path_factory.mktemp("model") / "model.safetensors")


# ---- atomic writes ------------------------------------------------------------------------------

def test_atomic_write_gives_normal_permissions_and_cleans_up_after_killed_writers(tmp_path: Path) -> None:
    target = tmp_path / "model.safetensors"
    stale = tmp_path / ".model.safetensors.abc123.tmp"  # what a SIGKILL during a write leaves
    stale.write_bytes(b"half a file")
    atomic_write(target, b"new")
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask  # not mkstemp's 0600


def test_atomic_write_failure_in_the_writer_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "cm.json"
    atomic_write(target, b"old")

    def explode(f):
        f.write(b"partial")
        raise KeyboardInterrupt  # e.g. Ctrl-C in the middle of a write

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, explode)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cm.json"]


FULL_DISK_CHILD = """
import json, resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the process at the limit
from cifarlab.modelfile import atomic_save_safetensors, load_model, save_model
from safetensors.torch import load_file
model = load_model(sys.argv[1])
tensors = load_file(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[2]),) * 2)
try:
    if sys.argv[3] == "model":
        save_model(model, sys.argv[1])
    else:
        atomic_save_safetensors(tensors, {"cifarlab-checkpoint": "{}"}, __import__("pathlib").Path(sys.argv[1]))
except Exception as e:
    print(json.dumps({"type": type(e).__name__, "message": str(e)}))
"""


@pytest.mark.parametrize("what", ["model", "checkpoint"])
def test_full_disk_keeps_the_previous_file_and_says_so(tmp_path: Path, model_path: Path, what: str) -> None:
    target = tmp_path / f"{what}.safetensors"
    target.write_bytes(model_path.read_bytes())
    before = target.read_bytes()
    env = {**os.environ, "PYTHONPATH": SRC}
    proc = subprocess.run([sys.executable, "-c", FULL_DISK_CHILD, str(target), "100000", what],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    error = json.loads(proc.stdout)
    assert error["type"] == "StorageError"
    assert "the disk is full" in error["message"] and f"The previous {target.name} is unchanged" in error["message"]
    assert ("checkpoint" if what == "checkpoint" else "model file") in error["message"]
    assert target.read_bytes() == before and load_model(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]  # no temp file left behind


@pytest.fixture
def tiny_tmpfs(tmp_path: Path):
    """A 1 MiB tmpfs (root only); skipped where mounting is not allowed."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_real_enospc_on_a_full_tmpfs(tiny_tmpfs: Path) -> None:
    target = tiny_tmpfs / "cm.json"
    atomic_write(target, b"x" * 600_000)
    with pytest.raises(StorageError, match=r"the disk is full \(No space left on device.*unchanged"):
        atomic_write(target, b"y" * 600_000)  # the old file and the temporary one do not both fit
    assert target.read_bytes() == b"x" * 600_000
    assert sorted(p.name for p in tiny_tmpfs.iterdir()) == ["cm.json"]
    with pytest.raises(StorageError, match="Nothing was written"):
        save_model(tiny_classifier(), tiny_tmpfs / "model.safetensors")


DOWNLOAD_CHILD = """
import json, resource, signal, sys
from pathlib import Path
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000,) * 2)
from cifarlab.data import download
try:
    download(sys.argv[1], Path(sys.argv[2]), sys.argv[3], progress=False)
except Exception as e:
    print(json.dumps({"type": type(e).__name__, "message": str(e)}))
"""


def test_download_on_a_full_disk_keeps_the_partial_file_and_resumes(server, tmp_path: Path) -> None:

    from cifarlab.data import download

    server.files["/f.tar.gz"] = PAYLOAD
    url, dest = url_of(server, "/f.tar.gz"), tmp_path / "f.tar.gz"
    proc = subprocess.run([sys.executable, "-c", DOWNLOAD_CHILD, url, str(dest), PAYLOAD_MD5],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": SRC}, timeout=120)
    error = json.loads(proc.stdout)
    assert error["type"] == "StorageError" and "the disk is full" in error["message"], proc.stderr
    assert "keeps the 1,000,000 bytes" in error["message"] and not dest.exists()
    assert download(url, dest, PAYLOAD_MD5, progress=False).read_bytes() == PAYLOAD  # resumed, verified
    assert server.ranges[-1] == "bytes=1000000-"


# ---- untrusted model files ------------------------------------------------------------------------

def damaged(tmp_path: Path, edit) -> Path:
    """The tiny model's weights with its metadata JSON changed by `edit` (dict -> dict or str)."""
    model = tiny_classifier()
    meta = edit(json.loads(json.dumps(model.meta.to_dict())))
    path = tmp_path / f"{uuid.uuid4().hex}.safetensors"
    text = meta if isinstance(meta, str) else json.dumps(meta)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata={METADATA_KEY: text})
    return path


@pytest.mark.parametrize("edit,message", [
    (lambda m: '{"format": "cifarlab-model", ', "not valid JSON"),
    (lambda m: "[1, 2]", "should be a JSON object"),
    (lambda m: "[" * 100_000 + "]" * 100_000, "not valid JSON"),
    (lambda m: {**m, "architecture": "resnet9000"}, "unknown model 'resnet9000'"),
    (lambda m: {**m, "arch_args": {"wilths": [1]}}, "no buildable"),
    (lambda m: {**m, "num_classes": 10**9, "classes": ["x"] * 3}, "'classes'"),
    (lambda m: {**m, "preprocessing": {"mean": [0, 0], "std": [1, 1, 1]}}, "'preprocessing'"),
    (lambda m: {**m, "input": {"height": "32"}}, "'input'"),
    (lambda m: {**m, "num_classes": 7, "classes": [str(i) for i in range(7)]}, "weights do not match"),
    (lambda m: {**m, "format_version": "1"}, "unsupported model format"),
])
def test_damaged_metadata_is_refused_without_building_anything(tmp_path: Path, edit, message: str) -> None:
    with pytest.raises(ModelFileError, match=message):
        load_model(damaged(tmp_path, edit))


def test_a_header_listing_extra_tensors_is_refused_before_any_is_read(tmp_path: Path, monkeypatch) -> None:
    """5,000 tensors listed beside the 41 the architecture needs: refused from the header's
    names, with no tensor read (before, all 5,041 were loaded, then compared); beyond 10,000
    listed, any cifarlab safetensors file (a checkpoint too) is refused by the count alone."""
    import safetensors

    model = tiny_classifier()
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    needed = len(tensors)
    tensors.update({f"extra.{i}": torch.zeros(1) for i in range(20_000)})
    path, many = tmp_path / "some.safetensors", tmp_path / "many.safetensors"
    metadata = {METADATA_KEY: json.dumps(model.meta.to_dict())}
    save_file(dict(list(tensors.items())[:needed + 5_000]), str(path), metadata=metadata)
    save_file(tensors, str(many), metadata=metadata)
    read: list[str] = []

    class CountingOpen:  # the real safe_open, counting the tensors read through it
        def __init__(self, *args, **kwargs):
            self.inner = safetensors.safe_open(*args, **kwargs)

        def __enter__(self):
            self.file = self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def __getattr__(self, name):
            return getattr(self.file, name)

        def get_tensor(self, name):
            read.append(name)
            return self.file.get_tensor(name)

    monkeypatch.setattr("cifarlab.modelfile.safe_open", CountingOpen)
    with pytest.raises(ModelFileError, match=f"5,{needed:03d} tensors listed, {needed} needed"):
        load_model(path)
    for reader in (load_model, read_checkpoint):
        with pytest.raises(ModelFileError, match=f"lists 20,{needed:03d} tensors; .*refused above 10,000"):
            reader(many)
    assert read == []
    load_model(save_model(model, tmp_path / "ok.safetensors"))
    assert len(read) == needed  # a good file: each weight read once


SPLIT = {"method": "stratified", "seed": 0, "val_fraction": 0.1, "n_train": 9, "n_val": 1, "val_indices_sha256": "0"}


@pytest.mark.parametrize("edit,message", [
    # Each of these was read only later, by evaluate or diagnose, and was a traceback there:
    (lambda m: {**m, "dataset": 5}, "'dataset' must hold a JSON object, got int 5"),  # AttributeError
    (lambda m: {**m, "split": "x"}, "'split' must hold a JSON object"),  # AttributeError (--split val)
    (lambda m: {**m, "split": {"n_val": "3"}}, "'split' lacks seed, val_fraction, n_train"),  # KeyError
    (lambda m: {**m, "split": {**SPLIT, "val_fraction": 2}}, "'val_fraction' must be a number in"),
    (lambda m: {**m, "metrics": {"val_acc": "high"}}, "'val_acc' must be a number in \\[0, 1\\]"),  # ValueError
    # ... or was blamed on the labels ("check the label encoding") instead of the file:
    (lambda m: {**m, "coarse_classes": ["x"], "coarse_of_fine": [99, 0, 0]}, "'coarse_of_fine' must hold one"),
    (lambda m: {**m, "coarse_classes": ["x"], "coarse_of_fine": "ab"}, "'coarse_of_fine' must hold one"),
    (lambda m: {**m, "coarse_classes": ["x"]}, "lacks coarse_of_fine"),
])
def test_damaged_provenance_fields_are_refused_on_load(tmp_path: Path, edit, message: str, capsys) -> None:
    """dataset, split, metrics and the coarse map are checked with the rest of the metadata,
    not by the command that happens to use them first."""
    path = damaged(tmp_path, edit)
    with pytest.raises(ModelFileError, match=message):
        load_model(path)
    assert main(["evaluate", str(path), "--data", "cifar10"]) == 2
    assert "the file was damaged or edited" in capsys.readouterr().err


def test_a_model_file_reads_back_as_the_record_it_was_written_from(tmp_path: Path) -> None:
    model = tiny_classifier()
    meta = dataclasses.replace(model.meta, split=SPLIT, metrics={"val_acc": 0.5, "epochs": 3}, recipe={"lr": 0.1})
    model.meta = meta
    loaded = load_model(save_model(model, tmp_path / "m.safetensors")).meta
    assert loaded == meta and loaded.split == SPLIT and loaded.metrics == {"val_acc": 0.5, "epochs": 3}
    assert isinstance(loaded.metrics["epochs"], int)  # counts stay integers
    assert loaded.image_size == (32, 32) and loaded.preprocessing.std == tuple(STATS["std"])


def test_a_huge_architecture_in_the_metadata_is_never_allocated(tmp_path: Path) -> None:
    # 10**6 output classes of width 512: 2 GB of weights if built before checking. Refused by
    # the metadata's bounds now, before even the shapes are compared.
    path = damaged(tmp_path, lambda m: {**m, "num_classes": 10**6, "classes": ["c"] * 10**6})
    with pytest.raises(ModelFileError, match=r"'num_classes' must be an integer in \[1, 10,000\]"):
        load_model(path)
    # Within the bounds, a head that does not match the stored weights is still found by shape.
    path = damaged(tmp_path, lambda m: {**m, "num_classes": 9_000, "classes": ["c"] * 9_000})
    with pytest.raises(ModelFileError, match="weights do not match"):
        load_model(path)


@pytest.mark.parametrize("edit,message", [
    (lambda m: {**m, "arch_args": {"widths": [10**6, 10**6, 10**6]}}, "arch_args 'widths' must be"),
    (lambda m: {**m, "arch_args": {"widths": "wide"}}, "arch_args 'widths' must be"),
    (lambda m: {**m, "preprocessing": {**m["preprocessing"], "std": [0, 1, 1]}}, "'std' must be a number in"),
    (lambda m: {**m, "preprocessing": {**m["preprocessing"], "mean": [float("nan"), 0, 0]}}, "'mean' must be"),
    (lambda m: {**m, "input": {**m["input"], "height": 10**6}}, "'height' must be an integer in"),
    (lambda m: {**m, "classes": [1, 2]}, "'classes' must be a list of strings"),
    (lambda m: {**m, "train_input_stats": {"mean": [1, 2, 3]}}, "'std' must be 3 per-channel numbers"),
    (lambda m: {**m, "metrics": [0.5]}, "'metrics' must hold a JSON object"),
])
def test_each_metadata_field_is_checked_with_its_name(tmp_path: Path, edit, message: str) -> None:
    with pytest.raises(ModelFileError, match=re.escape(message)):
        load_model(damaged(tmp_path, edit))


# ---- bad arrays for models -------------------------------------------------------------------------

@pytest.mark.parametrize("images,message", [
    ([np.zeros((32, 32, 3)), np.zeros((16, 16, 3))], "numpy cannot stack"),
    (np.array([["a"]]), "dtype <U1"),
    (np.zeros((2, 32, 32, 3), dtype=object), "dtype object"),
    (np.zeros((2, 32, 32, 3), dtype=bool), "dtype bool"),
    (np.full((2, 32, 32, 3), np.nan, np.float32), "NaN or inf"),
    (np.zeros((2, 32, 32, 4), np.uint8), "RGBA"),
    (np.zeros((2, 32, 32, 1), np.uint8), "grayscale"),
    (np.zeros((2, 64, 64, 3), np.uint8), "resize_images"),
    (np.zeros((2, 3, 32, 32), np.uint8), "NCHW"),
    (np.zeros((2, 32, 32, 3), np.float32) + 0.5, "already scaled"),
])
def test_predict_says_what_it_expected_and_what_it_got(images, message: str) -> None:
    with pytest.raises(InputError, match=message):
        validate_images(images)


def test_resize_images_keeps_dtype_scale_and_layout() -> None:
    x = np.full((2, 64, 48, 3), 200, np.uint8)
    assert resize_images(x).shape == (2, 32, 32, 3) and resize_images(x).dtype == np.uint8
    assert (resize_images(x) == 200).all()
    floats = np.full((1, 3, 40, 40), 0.5, np.float32)
    out = resize_images(floats, layout="NCHW")
    assert out.shape == (1, 3, 32, 32) and out.dtype == np.float32 and np.allclose(out, 0.5)
    with pytest.raises(InputError, match="size must be"):
        resize_images(x, (0, 32))
    with pytest.raises(InputError, match="size must be 1..4096"):
        resize_images(x, (10**6, 10**6))


def test_resizing_works_in_bounded_chunks_and_refuses_what_would_not_fit(monkeypatch) -> None:
    from cifarlab import imageops

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (37, 50, 40, 3), dtype=np.uint8)
    whole = imageops.resize_images(images, (24, 24))
    monkeypatch.setattr(imageops, "CHUNK_BYTES", 4 * 3 * 50 * 40 * 5)  # five images a chunk
    np.testing.assert_array_equal(imageops.resize_images(images, (24, 24)), whole)  # the same, chunk by chunk
    floats = images.transpose(0, 3, 1, 2).astype(np.float32) / 255
    np.testing.assert_allclose(imageops.resize_images(floats, (24, 24), layout="NCHW"),
                               whole.transpose(0, 3, 1, 2) / 255, atol=1 / 255)
    # 10,000 images at 224x224 in float32 would be 5.6 GiB: refused before anything is allocated.
    many = np.broadcast_to(np.float32(0.5), (10_000, 32, 32, 3))
    with pytest.raises(InputError, match=r"would take 5.6 GiB \(at most 4 GiB\); resize fewer images"):
        imageops.resize_images(many, (224, 224))


def write_png(path: Path, size=(32, 32)) -> Path:
    Image.new("RGB", size, (1, 2, 3)).save(path)
    return path


def test_read_image_refuses_bombs_and_disguised_formats(tmp_path: Path) -> None:

    (tmp_path / "bomb.png").write_bytes(pixel_bomb_png())
    (tmp_path / "eps.png").write_bytes(EPS)
    with pytest.raises(InputError, match="decompression bomb"):
        read_image(tmp_path / "bomb.png", (32, 32), resize=True)
    with pytest.raises(InputError, match="cannot be read as an image"):
        read_image(tmp_path / "eps.png", (32, 32))
    assert read_image(write_png(tmp_path / "big.png", (64, 64)), (32, 32), resize=True).shape == (32, 32, 3)


# ---- the command line: exit status 2, a message, no traceback ------------------------------------

def run_cli(capsys, *args) -> tuple[int, str]:
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


@pytest.fixture
def files(tmp_path: Path, model_path: Path) -> dict[str, Path]:

    f = {"model": model_path, "png": write_png(tmp_path / "ok.png"), "big": write_png(tmp_path / "big.png", (64, 64))}
    (tmp_path / "bomb.png").write_bytes(pixel_bomb_png())
    (tmp_path / "eps.png").write_bytes(EPS)
    f.update(bomb=tmp_path / "bomb.png", eps=tmp_path / "eps.png")
    for name, text in {"ragged.json": "[[1, 2], [3]]", "deep.json": "[" * 50_000 + "]" * 50_000,
                       "huge.json": f"[[{10**30}, 0], [0, 1]]", "negative.json": "[[1, -2], [0, 1]]",
                       "ids.csv": "0\n1\n1000000000000\n", "empty.npy": ""}.items():
        (tmp_path / name).write_text(text)
        f[name] = tmp_path / name
    np.save(tmp_path / "nan.npy", np.full((20, 3), np.nan))
    np.save(tmp_path / "probs.npy", np.full((20, 3), 1 / 3))
    np.save(tmp_path / "labels7.npy", np.zeros(7, np.int64))
    np.save(tmp_path / "x64.npy", np.zeros((20, 64, 64, 3), np.uint8))
    np.save(tmp_path / "y20.npy", np.arange(20) % 3)
    f.update({k: tmp_path / k for k in ("nan.npy", "probs.npy", "labels7.npy", "x64.npy", "y20.npy")})
    folder = tmp_path / "photos"
    for name, data in IMAGES.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    (folder / "train" / "cat" / "broken.png").write_bytes(b"\x89PNG broken")
    f["folder"] = folder
    return f


BAD_COMMANDS = [
    (["predict", "model", "png", "--top", "0"], "--top must be a positive"),
    (["predict", "model", "bomb"], "decompression bomb"),
    (["predict", "model", "eps"], "cannot be read as an image"),
    (["predict", "model", "big"], "pass --resize"),
    (["predict", "png", "png"], "not a readable safetensors file"),
    (["diagnose", "--confusion", "ragged.json"], "square matrix"),
    (["diagnose", "--confusion", "deep.json"], "not valid JSON"),
    (["diagnose", "--confusion", "huge.json"], "more than any real count"),
    (["diagnose", "--confusion", "negative.json"], "non-negative count"),
    (["diagnose", "--predictions", "ids.csv"], "class ids go up to"),
    (["diagnose", "--predictions", "empty.npy"], "cannot read"),
    (["diagnose", "--predictions", "nan.npy"], "NaN or inf"),
    (["diagnose", "--predictions", "probs.npy", "--labels", "labels7.npy"], "7 labels"),
    (["diagnose", "--model", "model", "--images", "x64.npy", "--labels", "y20.npy", "--max-images", "0"],
     "max_images must be a positive"),
    (["data", "folder"], "--bad-images skip"),
]


@pytest.mark.parametrize("args,message", BAD_COMMANDS, ids=[" ".join(a[:2]) + f" {i}" for i, (a, _) in
                                                           enumerate(BAD_COMMANDS)])
def test_bad_input_exits_2_with_a_message(capsys, files, args, message, monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("CIFARLAB_HOME", str(tmp_path / "home"))
    code, err = run_cli(capsys, *[files.get(a, a) for a in args])
    assert code == 2, err
    assert "cifarlab: error: " in err and message in err and "Traceback" not in err


def test_data_skips_bad_images_when_asked_and_lists_them(capsys, files, monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("CIFARLAB_HOME", str(tmp_path / "home"))
    with pytest.warns(UserWarning, match="left out"):
        code = main(["data", str(files["folder"]), "--bad-images", "skip"])
    out = capsys.readouterr().out
    assert code == 0 and "left out 1 images" in out and "broken.png" in out


def test_diagnose_offers_resize_and_resize_works(capsys, files) -> None:
    from cifarlab.diagnosis import diagnose

    x, y = np.load(files["x64.npy"]), np.load(files["y20.npy"])
    as_given = diagnose(model=files["model"], images=x, labels=y)
    assert as_given.summary["runs_as_given"] is False and "--resize" in as_given.summary["as_given_error"]
    # Never "healthy" about a model that could not run: that is the finding, an error.
    assert as_given.verdict == "problem" and as_given.exit_code == 1
    top = as_given.ranked()[0]
    assert top.id == "input-shape" and top.severity == "error" and "(N, 32, 32, 3)" in top.fix
    assert top.evidence["images_shape"] == [20, 64, 64, 3]
    for shape in [(20, 32, 32, 1), (20, 32, 32, 4), (20, 28, 28, 3)]:  # grayscale, RGBA, another size
        result = diagnose(model=files["model"], images=np.zeros(shape, np.uint8), labels=y)
        assert result.verdict == "problem" and result.ranked()[0].id == "input-shape", shape
    resized = diagnose(model=files["model"], images=x, labels=y, resize=True)
    assert "runs_as_given" not in resized.summary and resized.summary["num_samples"] == 20
    code, err = run_cli(capsys, "diagnose", "--model", files["model"], "--images", files["x64.npy"],
                        "--labels", files["y20.npy"], "--resize", "--json")
    assert code in (0, 1), err


def test_an_os_error_is_a_message_not_a_traceback(capsys, tmp_path) -> None:
    (tmp_path / "cm.json").write_text("[[5, 1], [0, 7]]")
    (tmp_path / "plots").write_text("a file where a folder should be")
    code, err = run_cli(capsys, "diagnose", "--confusion", tmp_path / "cm.json", "--plot", tmp_path / "plots")
    assert code == 2 and err.startswith("cifarlab: error:") and "plots" in err


def test_no_traceback_reaches_the_user_and_debug_shows_it(tmp_path: Path) -> None:
    (tmp_path / "deep.json").write_text("[" * 50_000 + "]" * 50_000)
    plain = subprocess.run([sys.executable, "-m", "cifarlab", "diagnose", "--confusion", str(tmp_path / "deep.json")],
                           capture_output=True, text=True, env={**os.environ, "PYTHONPATH": SRC})
    assert plain.returncode == 2 and "Traceback" not in plain.stderr and "not valid JSON" in plain.stderr
    with pytest.raises(CifarlabError, match="not valid JSON"):  # --debug lets the exception (and its traceback) out
        main(["--debug", "diagnose", "--confusion", str(tmp_path / "deep.json")])


# ---- ONNX files with unexpected inputs and outputs ------------------------------------------------

def onnx_model(tmp_path: Path, name: str, inputs, outputs, nodes) -> Path:
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from onnx import helper

    model = helper.make_model(helper.make_graph(nodes, name, inputs, outputs),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, path)
    return path


def onnx_cases(tmp_path: Path) -> dict[str, tuple[Path, str | None]]:
    pytest.importorskip("onnx")
    from onnx import TensorProto as T
    from onnx import helper

    vi = helper.make_tensor_value_info
    mean_hw = [helper.make_node("ReduceMean", ["x"], ["m"], axes=[1, 2], keepdims=0)]
    image = vi("x", T.FLOAT, ["N", 32, 32, 3])
    scores = vi("m", T.FLOAT, ["N", 3])
    labels_first = [*mean_hw, helper.make_node("ArgMax", ["m"], ["l"], axis=1, keepdims=0)]
    cases = {
        "two-inputs": ([image, vi("y", T.FLOAT, [1])], [scores], mean_hw, "declares 2 inputs"),
        "rank-2-input": ([vi("x", T.FLOAT, ["N", 3072])], [vi("m", T.FLOAT, ["N", 1])],
                         [helper.make_node("ReduceMean", ["x"], ["m"], axes=[1], keepdims=1)], "of rank 2"),
        "int64-input": ([vi("x", T.INT64, ["N", 32, 32, 3])], [scores],
                        [helper.make_node("Cast", ["x"], ["f"], to=T.FLOAT),
                         helper.make_node("ReduceMean", ["f"], ["m"], axes=[1, 2], keepdims=0)],
                        "expected uint8 or float images"),
        "no-channel-axis": ([vi("x", T.FLOAT, ["N", "H", "W", "C"])], [scores], mean_hw, "layout"),
        "unknown-shape": ([vi("x", T.FLOAT, None)], [vi("m", T.FLOAT, None)],
                          [helper.make_node("Identity", ["x"], ["m"])], "rank"),
        "string-input": ([vi("x", T.STRING, ["N"])], [vi("m", T.STRING, ["N"])],
                         [helper.make_node("Identity", ["x"], ["m"])], "rank 1"),
        "scalar-output": ([image], [vi("m", T.FLOAT, [])],
                          [helper.make_node("ReduceMean", ["x"], ["m"], keepdims=0)], r"expected \(N, classes\)"),
        "rank-1-output": ([image], [vi("m", T.FLOAT, ["N"])],
                          [helper.make_node("ReduceMean", ["x"], ["m"], axes=[1, 2, 3], keepdims=0)],
                          "declares outputs"),
        "labels-then-scores": ([image], [vi("l", T.INT64, ["N"]), scores], labels_first, None),  # sklearn-onnx style
    }
    return {name: (onnx_model(tmp_path, name, *spec[:3]), spec[3]) for name, spec in cases.items()}


def test_onnx_files_with_unexpected_inputs_or_outputs(tmp_path: Path) -> None:
    from cifarlab.diagnosis import diagnose

    x = np.random.default_rng(0).random((30, 32, 32, 3), dtype=np.float32)
    y = np.arange(30) % 3
    (tmp_path / "garbage.onnx").write_bytes(b"\x08\x07 not a protobuf")
    cases = {**onnx_cases(tmp_path), "garbage": (tmp_path / "garbage.onnx", "not a loadable ONNX model")}
    for name, (path, message) in cases.items():
        if message is None:
            assert diagnose(model=path, images=x, labels=y).summary["num_samples"] == 30, name
            continue
        with pytest.raises(CifarlabError, match=message):
            diagnose(model=path, images=x, labels=y)


def test_train_and_resume_offer_and_take_resize(capsys, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("CIFARLAB_HOME", str(tmp_path / "home"))
    folder, rng = tmp_path / "big-images", np.random.default_rng(0)
    for split, n in (("train", 10), ("test", 2)):
        for cls in ("ant", "bee"):
            (folder / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / split / cls / f"{i}.png")
    train = ["train", "--data", folder, "--model", "airbench-small", "--epochs", "1", "--batch-size", "8",
             "--device", "cpu", "--out", tmp_path / "run", "--quiet"]
    code, err = run_cli(capsys, *train)
    assert code == 2 and "Pass --resize" in err
    code, err = run_cli(capsys, *train, "--resize")
    assert code == 0, err
    # The run records --resize, so resuming needs no flags...
    code, err = run_cli(capsys, "train", "--resume", tmp_path / "run", "--epochs", "2", "--quiet")
    assert code == 0, err
    assert load_model(tmp_path / "run" / "model.safetensors").meta["metrics"]["epochs"] == 2
    # ...and still takes them (for runs whose checkpoint predates the recording).
    code, err = run_cli(capsys, "train", "--resume", tmp_path / "run", "--epochs", "3", "--resize", "--quiet")
    assert code == 0, err
    assert load_model(tmp_path / "run" / "model.safetensors").meta["metrics"]["epochs"] == 3


def test_onnx_failures_and_runaway_graphs_are_clear_errors(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("onnx")
    from onnx import TensorProto as T
    from onnx import helper, numpy_helper

    from cifarlab import onnx as cifarlab_onnx

    vi = helper.make_tensor_value_info
    image = vi("x", T.FLOAT, ["N", 32, 32, 3])
    # A reshape to a fixed 7 elements: valid as a graph, fails inside onnxruntime on any batch.
    shape = numpy_helper.from_array(np.array([7], np.int64), "shape")
    bad = onnx_model(tmp_path, "bad-reshape", [image], [vi("m", T.FLOAT, ["N", 3])],
                     [helper.make_node("Constant", [], ["shape"], value=shape),
                      helper.make_node("Reshape", ["x", "shape"], ["m"])])
    x = np.random.default_rng(0).random((4, 32, 32, 3), dtype=np.float32)
    runner = cifarlab_onnx.open_onnx(bad)
    with pytest.raises(InputError, match=r"onnxruntime failed running bad-reshape.onnx on a batch of shape \(4, 32, 32, 3\)"):
        runner.logits(x)
    # A slow graph: 40 chained 3072x3072 matrix products per batch.
    weight = numpy_helper.from_array(np.eye(3072, dtype=np.float32), "w")
    nodes = [helper.make_node("Constant", [], ["w"], value=weight),
             helper.make_node("Flatten", ["x"], ["h0"])]
    nodes += [helper.make_node("MatMul", [f"h{i}", "w"], [f"h{i + 1}"]) for i in range(40)]
    nodes += [helper.make_node("Slice", ["h40", "starts", "ends", "axes"], ["m"])]
    for name, value in (("starts", 0), ("ends", 3), ("axes", 1)):
        nodes.insert(0, helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.array([value]), name)))
    slow = onnx_model(tmp_path, "slow", [image], [vi("m", T.FLOAT, ["N", 3])], nodes)
    monkeypatch.setattr(cifarlab_onnx, "ONNX_BATCH_SECONDS", 0.05)
    with pytest.raises(InputError, match=r"slow.onnx ran longer than 0.05 s on one batch of 500 images"):
        cifarlab_onnx.open_onnx(slow).logits(np.zeros((500, 32, 32, 3), np.float32))


def test_npz_members_are_bounded_before_numpy_allocates(tmp_path: Path, monkeypatch) -> None:
    import io
    import zipfile

    from cifarlab.diagnosis import inputs
    from cifarlab.diagnosis.inputs import load_array

    # A member whose header claims 10^12 float64 values in a few bytes of data.
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f8", "fortran_order": False, "shape": (10**12,)})
    with zipfile.ZipFile(tmp_path / "liar.npz", "w") as archive:
        archive.writestr("probs.npy", header.getvalue() + bytes(64))
    with pytest.raises(InputError, match="declares 8,000,000,000,000 bytes of data but holds"):
        load_array(tmp_path / "liar.npz", "predictions")
    # A member beyond the cap (lowered here: the real one is 8 GiB), refused by its declared size.
    monkeypatch.setattr(inputs, "MAX_ARRAY_BYTES", 1024**2)
    np.savez_compressed(tmp_path / "bomb.npz", probs=np.zeros((2, 1024**2 // 8)))
    with pytest.raises(InputError, match="expands to 2,097,280 bytes; cifarlab reads arrays up to 1,048,576"):
        load_array(tmp_path / "bomb.npz", "predictions")
    ok = tmp_path / "ok.npz"
    np.savez(ok, probs=np.eye(3))
    assert load_array(ok, "predictions").shape == (3, 3)


# ---- checkpoints for --resume: each field of the recorded state ------------------------------------

@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    ds = synthetic_dataset(num_classes=4)
    run = tmp_path_factory.mktemp("run")
    train(TrainConfig(**{**QUICK, "epochs": 2}), dataset=ds, run_dir=run, progress=False)
    return run, ds


@pytest.mark.parametrize("edit,message", [
    (lambda s: s["config"].update(epochs="8"), "'epochs' must be int | None, got str '8'"),
    (lambda s: s["config"].update(lr=float("nan")), "'lr' must be float | None"),
    (lambda s: s["config"].update(colour="red"), "fields this cifarlab does not know: colour"),
    (lambda s: s["config"].update(label_smoothing=2.0), "--label-smoothing must be in [0, 1)"),
    (lambda s: s["config"].update(arch_args={"widths": [10**7] * 3}), "arch_args 'widths' must be"),
    (lambda s: s["config"].update(plan={"epoch_seconds": "fast"}), "plan must map names to numbers"),
    (lambda s: s["history"][0].update(train_loss=None), "history[0]: 'train_loss' must be a number"),
    (lambda s: s["history"].reverse(), "the history's epochs must be 1..2 in order"),
    (lambda s: s.pop("optimizer"), "lacks optimizer"),
    (lambda s: s["optimizer"]["param_groups"].pop(), "weights or optimizer state do not fit the run"),
])
def test_a_damaged_checkpoint_is_refused_with_the_field_named(finished_run, tmp_path: Path, edit, message: str) -> None:
    run, ds = finished_run
    tensors, state = read_checkpoint(run / "checkpoint.safetensors")
    edit(state)
    damaged_run = tmp_path / "run"
    damaged_run.mkdir()
    save_file(tensors, str(damaged_run / "checkpoint.safetensors"), metadata={CHECKPOINT_KEY: json.dumps(state)})
    with pytest.raises(ModelFileError) as info:
        resume(damaged_run, dataset=ds, epochs=3, progress=False)
    assert message in str(info.value) and "start the run again" in str(info.value)
    assert not (damaged_run / "model.safetensors").exists()


# ---- small truths: messages that say what the thing given is ---------------------------------------

def test_what_was_given_is_named(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.safetensors").write_bytes(b"x")
    huge = tmp_path / "huge.json"
    huge.write_text("[[" + "9" * 5000 + ", 1], [0, 1]]")  # beyond Python's 4,300-digit int limit
    np.save(tmp_path / "empty.npy", np.zeros((0,), np.int64))
    cases = [
        (["evaluate", run], f"{run} is a folder, not a model file"),
        (["predict", run, tmp_path / "x.png"], f"{run} is a folder, not a model file"),
        (["diagnose", "--model", run, "--data", "cifar10"], f"{run} is a folder, not a model file"),
        (["evaluate", run / "checkpoint.safetensors"], f"is a training checkpoint, not a model: continue "
                                                        f"training with `cifarlab train --resume {run}`"),
        (["diagnose", "--confusion", huge], "is not valid JSON"),
        (["diagnose", "--predictions", tmp_path / "empty.npy"], "are empty (shape (0,)): there is nothing to diagnose"),
    ]
    for args, message in cases:
        assert main([str(a) for a in args]) == 2, args
        assert message in capsys.readouterr().err, args
    (run / "model.safetensors").write_bytes(b"x")
    assert main(["evaluate", str(run)]) == 2
    assert f"pass the model file inside it: {run / 'model.safetensors'}" in capsys.readouterr().err


def test_a_damaged_onnx_metadata_field_is_named(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    from cifarlab.onnx import check_onnx_meta

    good = {"onnx_input": "uint8", "preprocessing": {"mean": [0, 0, 0], "std": [255, 255, 255]}, "classes": ["a", "b"]}
    check_onnx_meta(good, tmp_path / "m.onnx")
    for edit, message in [({"onnx_input": "int4"}, "'onnx_input' must be uint8 or float"),
                          ({"preprocessing": {"mean": [0, 0], "std": [1, 1, 1]}}, "'mean' must be 3 per-channel"),
                          ({"preprocessing": {"mean": [0, 0, 0], "std": [0, 1, 1]}}, "'std' must be a number in"),
                          ({"onnx_input": "float"}, "a float-input export needs 'expected_preprocessing'"),
                          ({"classes": "ab"}, "'classes' must be a list of strings")]:
        with pytest.raises(ModelFileError, match=re.escape(message)):
            check_onnx_meta({**good, **edit}, tmp_path / "m.onnx")


def _main_in_thread(args: list[str], seconds: float = 60) -> int:
    """main(args)'s exit status; fails the test instead of hanging with it if main blocks."""
    import threading

    status: list[int] = []
    worker = threading.Thread(target=lambda: status.append(main(args)), daemon=True)
    worker.start()
    worker.join(seconds)
    assert status, f"cifarlab {' '.join(args)} did not return: it blocked on a file it should not have opened"
    return status[0]


@pytest.mark.parametrize("kind", ["fifo", "link-to-dev-zero"])
def test_json_and_csv_inputs_never_open_fifos_or_devices(tmp_path: Path, capsys, kind: str) -> None:
    """`--confusion`, `report --diagnosis`, an evaluation folder's metrics.json and `--history`
    read a pipe or a device by its type first: before, a FIFO made each of them wait forever."""
    odd = tmp_path / "odd.json"
    os.mkfifo(odd) if kind == "fifo" else odd.symlink_to("/dev/zero")
    folder = tmp_path / "eval"
    folder.mkdir()
    (folder / "metrics.json").symlink_to(odd)
    from cifarlab.diagnosis import diagnose

    good = tmp_path / "diag.json"
    good.write_text(diagnose(confusion=np.diag([50, 40, 45])).to_json())
    cases = [["diagnose", "--confusion", str(odd)],
             ["report", "--diagnosis", str(odd), "--out", str(tmp_path / "r.html")],
             ["report", str(folder), "--out", str(tmp_path / "r.html")],
             ["report", "--diagnosis", str(good), "--history", str(odd), "--out", str(tmp_path / "r.html")]]
    for args in cases:
        assert _main_in_thread(args) == 2, args
        assert "is not a regular file (a pipe, device or socket)" in capsys.readouterr().err, args
    from cifarlab.plots import plot_history

    with pytest.raises(InputError, match="not a regular file"):
        plot_history(odd, tmp_path / "h.png", title="t")


def test_an_input_that_is_not_a_file_is_named_for_what_it_is(tmp_path: Path, capsys) -> None:
    """A pipe, a device or a folder given as an input file: before, "file not found" or "no such
    image file" for something that exists (and a --confusion .npy was called --predictions)."""
    model = save_model(tiny_classifier(), tmp_path / "m.safetensors")
    pipe, device = tmp_path / "pipe.png", tmp_path / "zero.npy"
    os.mkfifo(pipe)
    device.symlink_to("/dev/zero")
    odd = "is not a regular file (a pipe, device or socket)"
    cases = [(["predict", model, pipe], f"image file {pipe} {odd}"),
             (["predict", pipe, model], f"model file {pipe} {odd}"),
             (["diagnose", "--predictions", device], f"--predictions: file {device} {odd}"),
             (["diagnose", "--confusion", device], f"--confusion: file {device} {odd}"),
             (["diagnose", "--predictions", tmp_path], f"--predictions: file {tmp_path} is a folder"),
             (["predict", model, tmp_path / "none.png"], f"image file not found: {tmp_path / 'none.png'}")]
    for args, message in cases:
        assert _main_in_thread([str(a) for a in args]) == 2, args
        assert message in capsys.readouterr().err, args
