"""The airbench pieces: whitening init, bias-only BatchNorm, parameter groups, schedule, flips."""

import numpy as np
import pytest
import torch

from cifarlab.augment import alternating_mirror, random_translate_flip
from cifarlab.models import create_model
from cifarlab.models.airbench import BiasOnlyBatchNorm
from cifarlab.training import Lookahead, TrainConfig, lr_at, parameter_groups


def correlated_images(n=256, seed=0):
    """Smooth random images: neighbouring pixels and the three channels strongly correlated."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 1, 9, 9, generator=gen)
    smooth = torch.nn.functional.interpolate(base, size=32, mode="bilinear", align_corners=False)
    return smooth.repeat(1, 3, 1, 1) + 0.1 * torch.randn(n, 3, 32, 32, generator=gen)


def test_whitening_filters_have_the_documented_shape_and_are_frozen():
    net = create_model("airbench-small", num_classes=10)
    assert net.whiten.weight.shape == (24, 3, 2, 2)  # 12 eigenvectors of 2x2x3 patches, and negatives
    assert not net.whiten.weight.requires_grad and net.whiten.bias.requires_grad


def test_whitening_init_decorrelates_patches():
    images = correlated_images()
    net = create_model("airbench-small", num_classes=10)
    net.init_whitening(images, eps=0.0)
    weight = net.whiten.weight
    assert torch.allclose(weight[12:], -weight[:12])
    out = torch.nn.functional.conv2d(images, weight[:12])  # no bias: the raw projections
    flat = out.permute(1, 0, 2, 3).reshape(12, -1).double()
    covariance = flat @ flat.T / flat.shape[1]
    # Whitened: unit variance, no correlation (the raw patches correlate at 0.9 and more).
    assert torch.allclose(covariance, torch.eye(12, dtype=torch.float64), atol=1e-3)


def test_bias_only_batchnorm_and_identity_init():
    net = create_model("airbench-small", num_classes=10)
    norms = [m for m in net.modules() if isinstance(m, BiasOnlyBatchNorm)]
    assert len(norms) == 6 and all(not m.weight.requires_grad and m.bias.requires_grad for m in norms)
    conv = net.features[1][0]  # first conv of the first group: 24 -> 32 channels
    x = torch.randn(2, 24, 8, 8)
    # Dirac init: its first 24 output channels copy the input channels.
    assert torch.allclose(conv(x)[:, :24], x, atol=1e-6)


def test_parameter_groups_scale_batchnorm_biases_and_skip_frozen_weights():
    net = create_model("airbench-small", num_classes=10)
    cfg = TrainConfig(model="airbench-small").resolved(torch.device("cpu"))
    groups = parameter_groups(net, cfg)
    by_id = {id(p): g for g in groups for p in g["params"]}
    bn_bias = net.features[1][2].bias
    assert by_id[id(bn_bias)]["lr_scale"] == cfg.bias_lr_scale == 64
    assert by_id[id(bn_bias)]["weight_decay"] == pytest.approx(cfg.weight_decay / 64)
    assert by_id[id(net.head.weight)]["lr_scale"] == 1.0
    assert by_id[id(net.whiten.bias)].get("whiten_bias") is True
    assert id(net.whiten.weight) not in by_id and id(net.features[1][2].weight) not in by_id
    trainable = {id(p) for p in net.parameters() if p.requires_grad}
    assert set(by_id) == trainable


def test_triangle_schedule_matches_airbench():
    peak = 2.0
    assert lr_at(0.0, peak, "triangle") == pytest.approx(0.2 * peak)
    assert lr_at(0.23, peak, "triangle") == pytest.approx(peak)
    assert lr_at(0.999999, peak, "triangle") == pytest.approx(0.07 * peak, abs=1e-5)
    values = [lr_at(p / 100, peak, "triangle") for p in range(100)]
    assert max(values) <= peak and np.argmax(values) == 23


def test_alternating_flips_mirror_each_image_every_other_epoch():
    first = torch.rand(1000, generator=torch.Generator().manual_seed(0)) < 0.5
    e1, e2, e3 = (alternating_mirror(first, e) for e in (1, 2, 3))
    assert torch.equal(e1, e3) and torch.equal(e2, ~e1)
    assert 400 < int(e1.sum()) < 600
    images = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8)
    mirror = torch.tensor([True, False, True, False])
    out = random_translate_flip(images, 0, mirror=mirror)
    assert torch.equal(out[0], images[0].flip(1)) and torch.equal(out[1], images[1])


def test_lookahead_pulls_weights_towards_their_average():
    net = torch.nn.Linear(3, 2)
    lookahead = Lookahead(net)
    start = net.weight.detach().clone()
    with torch.no_grad():
        net.weight.add_(1.0)
    lookahead.update(progress=1.0)  # decay 0.95^5: the average moves 23% of the way
    decay = 0.95 ** 5
    assert torch.allclose(net.weight, start + (1 - decay), atol=1e-6)
    with torch.no_grad():
        net.weight.add_(5.0)
    lookahead.reset_live()  # back to the average
    assert torch.allclose(net.weight, start + (1 - decay), atol=1e-6)


def test_many_class_datasets_get_the_cifar100_settings():
    cpu = torch.device("cpu")
    ten = TrainConfig(model="airbench-small").resolved(cpu, num_classes=10)
    hundred = TrainConfig(model="airbench-small").resolved(cpu, num_classes=100)
    assert (ten.label_smoothing, ten.epochs) == (0.2, 8)
    assert (hundred.label_smoothing, hundred.epochs) == (0.3, 8)
    # What the user sets wins over both.
    assert TrainConfig(model="airbench-small", label_smoothing=0.1).resolved(cpu, 100).label_smoothing == 0.1


def test_auto_picks_the_measured_width_for_the_device_and_the_number_of_classes():
    # README "Results": on a CPU, airbench-mid won CIFAR-100's 10-minute budget.
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert TrainConfig().resolved(cpu, num_classes=10).model == "airbench-small"
    assert TrainConfig().resolved(cpu, num_classes=100).model == "airbench-mid"
    assert TrainConfig().resolved(cuda, num_classes=100).model == "airbench"
    mid = create_model("airbench-mid", 100)
    assert sum(p.numel() for p in mid.parameters()) == pytest.approx(1.13e6, rel=0.01)


def test_auto_with_a_budget_takes_the_widest_network_it_holds_enough_epochs_of():
    """The choice from measured paces (injected here: the measure itself is a benchmark's job).
    The bf16 CPU's 10 minutes hold about 9 epochs of airbench-mid; the slow CPU kind's about
    1.7, where airbench-small reached 37% and airbench-mid 20% (benchmarks/slow_cpu.py)."""
    cpu = torch.device("cpu")
    fast = {"airbench-mid": 9.0, "airbench-small": 18.0}
    slow = {"airbench-mid": 1.7, "airbench-small": 3.4}
    # Fewer than 12 epochs: the short-run recipe (batch 500, lr scaled with it).
    on_fast = TrainConfig(time_budget=10).resolved(cpu, 100, fast.__getitem__)
    assert (on_fast.model, on_fast.batch_size, on_fast.lr) == ("airbench-mid", 500, 0.415)
    long = {"airbench-mid": 27.0, "airbench-small": 54.0}  # the bf16 CPU's 30 minutes
    on_long = TrainConfig(time_budget=30).resolved(cpu, 100, long.__getitem__)
    assert (on_long.model, on_long.batch_size, on_long.lr) == ("airbench-mid", 2000, 1.66)
    on_slow = TrainConfig(time_budget=10).resolved(cpu, 100, slow.__getitem__)
    assert (on_slow.model, on_slow.batch_size, on_slow.lr, on_slow.filter_lr) == ("airbench-small", 500, 0.415, 0.12)
    # A batch size the user gives is theirs, and then the recipe's lr stays whole.
    asked = TrainConfig(time_budget=10, batch_size=1000).resolved(cpu, 100, slow.__getitem__)
    assert (asked.batch_size, asked.lr) == (1000, 1.66)
    # A budget too short for even one epoch of the narrowest still gets it: the planner says why.
    assert TrainConfig(time_budget=1).resolved(cpu, 100, lambda model: 0.1).model == "airbench-small"
    # Up to 10 classes, a GPU, or a named model: nothing is measured.
    never = lambda model: pytest.fail("measured")  # noqa: E731
    assert TrainConfig(time_budget=10).resolved(cpu, 10, never).model == "airbench-small"
    assert TrainConfig(time_budget=10).resolved(torch.device("cuda"), 100, never).model == "airbench"


def test_the_pace_probe_measures_each_candidate_once_per_call():
    from cifarlab.training import BudgetEpochs

    probe = BudgetEpochs(torch.device("cpu"), False, 100, (32, 32), train_images=40_000, budget_s=600)
    estimates = [probe("airbench-small"), probe("airbench-mid")]
    assert all(0 < e < float("inf") for e in estimates)  # which is larger is timing: a benchmark's job
    assert "epochs of airbench-small" in probe.describe() and "epochs of airbench-mid" in probe.describe()
