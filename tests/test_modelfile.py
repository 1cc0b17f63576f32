"""The model file and its input contract: uint8 NHWC in, preprocessing inside, never pickle."""

import json
import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from cifarlab.errors import InputError, ModelFileError
from cifarlab.modelfile import build_classifier, input_statistics, load_model, make_meta, save_model

RNG = np.random.default_rng(0)
IMAGES = RNG.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
STATS = {"mean": [125.3, 123.0, 113.9], "std": [63.0, 62.1, 66.7], "min": [0, 0, 0], "max": [255, 255, 255]}


def classifier(architecture="airbench-small", num_classes=10):
    torch.manual_seed(0)
    meta = make_meta(architecture=architecture, arch_args={}, classes=[f"c{i}" for i in range(num_classes)],
                     train_stats=STATS, dataset={"name": "test"})
    return build_classifier(meta).eval()


@pytest.mark.parametrize("architecture", ["airbench-small", "keras-cnn"])
def test_save_load_round_trip(tmp_path, architecture):
    model = classifier(architecture)
    path = save_model(model, tmp_path / "model.safetensors")
    loaded = load_model(path)
    assert not loaded.training
    np.testing.assert_array_equal(loaded.predict_logits(IMAGES), model.predict_logits(IMAGES))
    assert loaded.meta == json.loads(json.dumps(model.meta.to_dict())) == model.meta
    assert loaded.meta["input"] == {"dtype": "uint8", "layout": "NHWC", "channels": "RGB",
                                    "height": 32, "width": 32, "range": [0, 255]}


def test_standardization_happens_inside_the_model():
    model = classifier("airbench-small")
    x = torch.from_numpy(IMAGES)
    expected_input = (x.permute(0, 3, 1, 2).float() - torch.tensor(STATS["mean"]).view(1, 3, 1, 1)) \
        / torch.tensor(STATS["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.net(expected_input))


def test_keras_cnn_bundles_divide_by_255():
    model = classifier("keras-cnn")
    assert model.meta["preprocessing"] == {"kind": "scale", "mean": [0.0] * 3, "std": [255.0] * 3}
    x = torch.from_numpy(IMAGES)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.net(x.permute(0, 3, 1, 2).float() / 255))


def test_predict_outputs():
    model = classifier()
    probs = model.predict_proba(IMAGES)
    assert probs.shape == (8, 10)
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)
    np.testing.assert_array_equal(model.predict(IMAGES), probs.argmax(1))
    assert model.predict(IMAGES[0]).shape == (1,)  # a single HWC image
    assert model.predict(torch.from_numpy(IMAGES)).shape == (8,)


@pytest.mark.parametrize("bad,message", [
    (IMAGES / 255.0, "already scaled"),                      # the seed's bug, the other way round
    ((IMAGES / 255.0 - 0.5) / 0.25, "Pass the images as stored"),
    (IMAGES.astype(np.int64), "astype(np.uint8)"),
    (IMAGES.transpose(0, 3, 1, 2), "NCHW"),
    (IMAGES[..., :1], "grayscale"),
    (np.concatenate([IMAGES, IMAGES[..., :1]], -1), "RGBA"),
    (IMAGES[:, :28, :28], "28x28"),
    (np.full((2, 32, 32, 3), np.nan), "NaN"),
    (IMAGES[0, 0], "shape"),
])
def test_predict_refuses_what_the_model_was_not_trained_on(bad, message):
    with pytest.raises(InputError, match=r"expected raw RGB images as uint8") as info:
        classifier().predict(bad)
    assert message in str(info.value)



@pytest.mark.parametrize("batch_size", [0, -5, 2.5, True])
def test_predict_refuses_a_batch_size_that_is_not_a_positive_integer(batch_size):
    with pytest.raises(InputError, match="batch_size must be a positive integer"):
        classifier().predict(IMAGES, batch_size=batch_size)


def test_input_statistics():
    stats = input_statistics(IMAGES)
    np.testing.assert_allclose(stats["mean"], IMAGES.reshape(-1, 3).mean(0), atol=1e-3)
    assert stats["min"] == IMAGES.reshape(-1, 3).min(0).tolist()


def test_pickle_files_are_refused_and_never_executed(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "model.pt"
    path.write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(ModelFileError, match="not a readable safetensors file"):
        load_model(path)
    assert not marker.exists()


def test_other_bad_files(tmp_path):
    with pytest.raises(ModelFileError, match="not found"):
        load_model(tmp_path / "missing.safetensors")
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(ModelFileError, match="without cifarlab metadata"):
        load_model(plain)
    good = save_model(classifier(), tmp_path / "good.safetensors")
    torn = tmp_path / "torn.safetensors"
    torn.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ModelFileError):
        load_model(torn)


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path):
    path = save_model(classifier(), tmp_path / "model.safetensors")
    save_model(classifier("keras-cnn"), path)  # overwrite in place
    assert load_model(path).meta["architecture"] == "keras-cnn"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
