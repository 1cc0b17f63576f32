"""A fast CIFAR CNN after Keller Jordan's airbench94 (94% on CIFAR-10 in 3.8 A100-seconds).

    whitening conv (2x2, frozen) -> GELU
    3 x [conv3x3 -> maxpool2 -> BN -> GELU -> conv3x3 -> BN -> GELU]
    global max pool -> linear (no bias) -> x 1/9

What makes it train fast, and why each piece is here:
- The first layer is a fixed whitening filter bank: the eigenvectors of the covariance of
  2x2 pixel patches of the training images, scaled by 1/sqrt(eigenvalue), and their
  negatives (so GELU passes both signs). The network starts from decorrelated inputs and
  never spends gradient steps learning edge detectors. `init_whitening` sets it from data;
  the trainer calls it once before the first step. Only its bias trains.
- BatchNorm layers keep their scale fixed at 1 and learn only a bias (the trainer gives
  those biases a much larger learning rate, see TrainConfig.bias_lr_scale): with a
  positively homogeneous network the scale is redundant, and fixing it removes a
  parameter the optimiser would otherwise have to tune.
- Each 3x3 conv starts as an identity on its first input channels (Dirac init), an
  implicit residual connection without the extra memory traffic of a real one.
- Pooling comes before BN/activation, so they run on a quarter of the pixels.
- The logits are scaled by 1/9: with max-pooled features the raw logits are large at
  init, and a small scale keeps the early softmax from saturating.
Widths are arguments so the same family scales from a laptop CPU to a GPU.
"""

from __future__ import annotations

import torch
from torch import nn

from cifarlab.models.registry import ModelSpec, register_model


class BiasOnlyBatchNorm(nn.BatchNorm2d):
    """BatchNorm whose scale stays at 1 (not trained); only the bias learns."""

    def __init__(self, channels: int, momentum: float = 0.4):
        # eps tiny: the fixed scale means nothing else bounds the normalised values anyway.
        super().__init__(channels, eps=1e-12, momentum=momentum)
        self.weight.requires_grad_(False)


def identity_init_conv(cin: int, cout: int) -> nn.Conv2d:
    conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
    with torch.no_grad():
        nn.init.dirac_(conv.weight[:min(cin, cout)])
    return conv


class ConvGroup(nn.Sequential):
    def __init__(self, cin: int, cout: int, bn_momentum: float):
        super().__init__(
            identity_init_conv(cin, cout), nn.MaxPool2d(2), BiasOnlyBatchNorm(cout, bn_momentum), nn.GELU(),
            identity_init_conv(cout, cout), BiasOnlyBatchNorm(cout, bn_momentum), nn.GELU(),
        )


class AirbenchNet(nn.Module):
    def __init__(self, num_classes: int, widths: tuple[int, ...] = (64, 256, 256),
                 whiten_kernel: int = 2, logit_scale: float = 1 / 9, bn_momentum: float = 0.4):
        super().__init__()
        whiten_width = 2 * 3 * whiten_kernel ** 2
        self.whiten = nn.Conv2d(3, whiten_width, whiten_kernel, padding=0, bias=True)
        self.whiten.weight.requires_grad_(False)
        if self.whiten.bias is not None:  # always, with bias=True; says so to the type checker
            nn.init.zeros_(self.whiten.bias)
        groups, cin = [], whiten_width
        for width in widths:
            groups.append(ConvGroup(cin, width, bn_momentum))
            cin = width
        self.features = nn.Sequential(nn.GELU(), *groups)
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.head = nn.Linear(cin, num_classes, bias=False)
        self.logit_scale = logit_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.pool(self.features(self.whiten(x))).flatten(1)
        return self.head(features) * self.logit_scale

    @torch.no_grad()
    def init_whitening(self, images: torch.Tensor, eps: float = 5e-4) -> None:
        """Set the whitening filters from preprocessed training images (N, 3, H, W) float."""
        k = self.whiten.kernel_size[0]
        patches = images.float().unfold(2, k, 1).unfold(3, k, 1)  # (N, C, H', W', k, k)
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, 3 * k * k).double()
        covariance = patches.T @ patches / len(patches)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)  # ascending order
        filters = (eigenvectors.T / torch.sqrt(eigenvalues.clamp_min(0) + eps)[:, None]).flip(0)
        filters = filters.reshape(-1, 3, k, k).to(self.whiten.weight)
        self.whiten.weight.copy_(torch.cat([filters, -filters]))




# airbench94_muon's recipe (94.0% on CIFAR-10 in 8 epochs, where airbench94's SGD needs
# 9.9): Muon on the conv filters (lr 0.24, momentum 0.6; scale-free, see optim.py), Nesterov
# SGD on the head and biases, a linear decay with no warm-up. Its SGD values are per summed
# loss over 2000 images with logits / 256 and a unit-std head; for cifarlab's mean loss and
# logits x 1/9 they become: head lr 0.67 x 2000 x (9/256)^2 = 1.66, BatchNorm (and whitening)
# biases 0.053 x 2000 = 106 = 1.66 x 64, and weight decay 4e-3 per step / 1.66 = 2.41e-3.
# One simplification: the whitening bias trains for the first 30% of the epochs at the
# scheduled rate (training.averaging.WARMUP_FRACTION), where airbench94_muon decays it to 0 over 3 of 8.
# Measured by benchmarks/train_speed.py on the CIFAR-10 JPEG copy with airbench-small on a
# 2-core CPU: 88.5% (TTA) after 8 epochs in 343 s, where airbench94's SGD recipe took 10
# epochs and 428 s for 88.8%.
_RECIPE = dict(optimizer="muon", lr=1.66, momentum=0.85, nesterov=True, weight_decay=2.41e-3,
               filter_lr=0.24, filter_momentum=0.6, bias_lr_scale=64.0, batch_size=2000, epochs=8,
               schedule="linear", label_smoothing=0.2, translate=2, fill="reflect",
               alternate_flip=True, lookahead=False)
# CIFAR-100: the same network with a 100-class head. With ten times the classes and a tenth
# of the images per class, the targets are softened more (label smoothing 0.3, in the
# 0.2-0.3 range CIFAR-100 speedruns use). Measured on the real CIFAR-100 with the CIFAR-10
# schedule (README "Results": 66.7% in a 10-minute CPU budget, 73.6% in 30); label
# smoothing itself was not swept.
_MANY_CLASS_RECIPE = dict(label_smoothing=0.3)


def _register_width(name: str, widths: tuple[int, int, int], description: str) -> None:
    """One airbench94-family network: the same recipe, its own widths."""
    register_model(ModelSpec(name=name, builder=AirbenchNet, preprocessing="standardize",
                             description=description, default_args=dict(widths=widths),
                             recipe=_RECIPE, many_class_recipe=_MANY_CLASS_RECIPE))


_register_width("airbench", (64, 256, 256), "airbench94 network, widths 64-256-256 (1.97M params); the GPU default")
# Between the two: on a 2-core CPU, the best of the three widths for CIFAR-100 in a 10-minute
# budget (benchmarks/recipe_sweep.py; README "Results"), the CPU default for many classes.
_register_width("airbench-mid", (48, 192, 192),
                "airbench94 family, widths 48-192-192 (1.1M params); the CPU default for more than 10 classes")
# Fewer channels for a 2-core CPU (see benchmarks/train_speed.py for its throughput).
_register_width("airbench-small", (32, 128, 128),
                "airbench94 family, widths 32-128-128 (0.5M params); the CPU default for up to 10 classes")
