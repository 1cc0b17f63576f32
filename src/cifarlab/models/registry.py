"""The architecture registry: name -> ModelSpec (builder, preprocessing, recipe)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from cifarlab.errors import CifarlabError


@dataclass(frozen=True)
class ModelSpec:
    name: str
    builder: Callable[..., nn.Module]  # builder(num_classes=..., **arch_args) -> nn.Module on NCHW float
    preprocessing: str  # "scale" or "standardize"
    description: str
    default_args: dict[str, Any] = field(default_factory=dict)
    recipe: dict[str, Any] = field(default_factory=dict)  # default TrainConfig overrides
    many_class_recipe: dict[str, Any] = field(default_factory=dict)  # on top, for > 10 classes


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(spec: ModelSpec) -> ModelSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"model {spec.name!r} is registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def get_model_spec(name: str) -> ModelSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise CifarlabError(
            f"unknown model {name!r}; available: {', '.join(list_models())}"
        ) from None


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def create_model(name: str, num_classes: int, **arch_args: Any) -> nn.Module:
    """Build the bare network (NCHW float input, logits output) with the spec's defaults."""
    spec = get_model_spec(name)
    return spec.builder(num_classes=num_classes, **{**spec.default_args, **arch_args})

