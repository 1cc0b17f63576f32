"""The Muon optimizer (optim.py) and the muon recipe's wiring into training."""

import pytest
import torch
from synthetic import QUICK, synthetic_dataset

from cifarlab.optim import Muon, orthogonalize
from cifarlab.training import TrainConfig, Trainer, lr_at, parameter_groups

MUON = dict(QUICK, optimizer="muon", filter_lr=0.2, filter_momentum=0.6, schedule="linear", lookahead=False)


@pytest.mark.parametrize("shape", [(64, 576), (576, 64), (32, 32)])
def test_orthogonalize_flattens_the_spectrum(shape):
    g = torch.Generator().manual_seed(0)
    # An ill-conditioned matrix: singular values spread over two orders of magnitude (the
    # iteration lifts a small one by about 3.4x per step, so 5 steps flatten this range).
    u, _ = torch.linalg.qr(torch.randn(shape[0], min(shape), generator=g))
    v, _ = torch.linalg.qr(torch.randn(shape[1], min(shape), generator=g))
    s = torch.logspace(0, -2, min(shape))
    matrix = u @ torch.diag(s) @ v.T
    result = orthogonalize(matrix, steps=5)
    assert result.shape == matrix.shape
    singular = torch.linalg.svdvals(result)
    # Muon's coefficients trade exactness for speed: the bulk lands in about [0.7, 1.2].
    assert singular.max() < 1.3 and singular.min() > 0.5
    # Same singular vectors: projecting onto the input's left/right bases is diagonal.
    projected = u.T @ result @ v
    off_diagonal = projected - torch.diag(torch.diagonal(projected))
    assert off_diagonal.abs().max() < 1e-3


def test_sgd_groups_match_torch_sgd_exactly():
    torch.manual_seed(0)
    ours, reference = torch.nn.Linear(5, 3), torch.nn.Linear(5, 3)
    reference.load_state_dict(ours.state_dict())
    settings = dict(lr=0.1, momentum=0.85, nesterov=True, weight_decay=0.01)
    opt_ours, opt_ref = Muon(ours.parameters(), **settings), torch.optim.SGD(reference.parameters(), **settings)
    for step in range(4):
        x = torch.randn(8, 5, generator=torch.Generator().manual_seed(step))
        for model, opt in ((ours, opt_ours), (reference, opt_ref)):
            opt.zero_grad()
            model(x).square().sum().backward()
            opt.step()
    for a, b in zip(ours.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)


def test_filter_updates_are_orthogonal_steps_of_fixed_norm_weights():
    conv = torch.nn.Conv2d(8, 16, 3, bias=False)
    with torch.no_grad():
        conv.weight.mul_(7.0)  # far from the fixed norm, to see the rescaling
    opt = Muon([{"params": [conv.weight], "orthogonalize": True}], lr=0.05, momentum=0.0)
    conv(torch.randn(4, 8, 6, 6)).square().mean().backward()
    before = conv.weight.detach().clone()
    opt.step()
    rescaled = before * (16 ** 0.5 / before.norm())
    step = (conv.weight.detach() - rescaled).reshape(16, -1) / -0.05
    # 16 x 72 filters: each of the 16 singular values of the step near 1, whatever the gradient's scale.
    singular = torch.linalg.svdvals(step)
    assert singular.min() > 0.5 and singular.max() < 1.3


def test_vectors_cannot_be_orthogonalized():
    with pytest.raises(ValueError, match="not vectors"):
        Muon([{"params": [torch.nn.Parameter(torch.zeros(4))], "orthogonalize": True}])


def test_muon_groups_the_conv_filters_apart():
    trainer = Trainer(TrainConfig(**MUON), synthetic_dataset(), progress=False)
    groups = parameter_groups(trainer.model, trainer.cfg)
    filters = [g for g in groups if g.get("orthogonalize")]
    assert len(filters) == 1
    assert all(p.ndim == 4 and p.requires_grad for p in filters[0]["params"])
    # Every 3x3 conv (two per group, three groups); the frozen whitening filters stay out.
    assert len(filters[0]["params"]) == 6
    assert filters[0]["momentum"] == 0.6 and filters[0]["weight_decay"] == 0.0
    assert filters[0]["lr_scale"] * trainer.cfg.lr == pytest.approx(0.2)
    assert not any(p.ndim == 4 for g in groups if not g.get("orthogonalize") for p in g["params"])
    assert isinstance(trainer.optimizer, Muon)


def test_linear_schedule():
    assert lr_at(0.0, 2.0, "linear") == 2.0
    assert lr_at(0.75, 2.0, "linear") == pytest.approx(0.5)


def test_cli_offers_every_optimizer_and_schedule():
    # cli.py lists them literally (it imports torch only when a command runs).
    from cifarlab.cli import build_parser
    from cifarlab.training import OPTIMIZERS, SCHEDULES
    train_parser = build_parser()._subparsers._group_actions[0].choices["train"]
    choices = {a.dest: a.choices for a in train_parser._actions}
    assert tuple(choices["optimizer"]) == OPTIMIZERS and tuple(choices["schedule"]) == SCHEDULES
