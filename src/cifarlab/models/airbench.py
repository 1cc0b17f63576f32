"""A fast modern CIFAR CNN in the style of Keller Jordan's airbench.

Stem conv, then three conv groups (conv -> maxpool -> BN -> GELU -> conv -> BN -> GELU),
global max pool and a linear head. No residual connections: at this depth BatchNorm
plus a short schedule trains just as well and each step is cheaper, which matters on a
laptop CPU. Widths are arguments so the same family scales from CPU to GPU.
"""

from __future__ import annotations

from torch import nn

from cifarlab.models import ModelSpec, register_model


def conv_bn(cin: int, cout: int, pool: bool = False) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1, bias=False)]
    if pool:
        layers.append(nn.MaxPool2d(2))  # pooling before BN/activation halves their cost
    layers += [nn.BatchNorm2d(cout), nn.GELU()]
    return layers


class AirbenchNet(nn.Module):
    def __init__(self, num_classes: int, widths: tuple[int, ...] = (64, 128, 256),
                 stem: int = 32, logit_scale: float = 1 / 9):
        super().__init__()
        layers = conv_bn(3, stem)
        cin = stem
        for width in widths:
            layers += conv_bn(cin, width, pool=True) + conv_bn(width, width)
            cin = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.head = nn.Linear(cin, num_classes, bias=False)
        # airbench scales the logits down: with max-pooled features the raw logits are
        # large at init, and a small scale keeps the early softmax from saturating.
        self.logit_scale = logit_scale

    def forward(self, x):
        features = self.pool(self.features(x)).flatten(1)
        return self.head(features) * self.logit_scale


_RECIPE = dict(optimizer="sgd", lr=0.4, momentum=0.9, nesterov=True, weight_decay=5e-4,
               batch_size=512, epochs=10, schedule="onecycle", label_smoothing=0.2,
               translate=2, fill="reflect")

register_model(ModelSpec(
    name="airbench",
    builder=AirbenchNet,
    preprocessing="standardize",
    description="airbench-style CNN, widths 64-128-256 (1.2M params); the GPU default",
    default_args=dict(widths=(64, 128, 256), stem=32),
    recipe=_RECIPE,
))

# A quarter of the compute: about 1,200 images/s of training on a 2-core CPU
# (benchmarks/train_speed.py --skip-curves measured 1,166).
register_model(ModelSpec(
    name="airbench-small",
    builder=AirbenchNet,
    preprocessing="standardize",
    description="airbench-style CNN, widths 32-64-128 (0.3M params); the CPU default",
    default_args=dict(widths=(32, 64, 128), stem=16),
    recipe=_RECIPE,
))
