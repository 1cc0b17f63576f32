"""Open whatever model the user has as a `ModelRunner` (cifarlab.runner) for diagnosis."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from torch import nn

from cifarlab.errors import CifarlabError
from cifarlab.modelfile import Classifier, load_model
from cifarlab.runner import ModelRunner, callable_runner, cifarlab_runner, module_runner


def open_model(model: str | Path | Classifier | nn.Module | Callable, *,
               input_spec: dict[str, Any] | None = None, classes: list[str] | None = None) -> ModelRunner:
    """A ModelRunner for a model file (.safetensors, .onnx), a Classifier, an nn.Module or a callable.

    `input_spec` (partial dicts are merged) and `classes` describe a live module or callable,
    whose input contract cannot be read from anywhere.
    """
    if isinstance(model, (str, Path)):
        path = Path(model)
        if path.suffix.lower() == ".onnx":
            from cifarlab.onnx import open_onnx  # onnxruntime is optional

            return open_onnx(path)
        return cifarlab_runner(load_model(path), name=f"{path.name}")
    if isinstance(model, Classifier):
        return cifarlab_runner(model, name="Classifier")
    if isinstance(model, nn.Module):
        return module_runner(model, input_spec, classes)
    if callable(model):
        return callable_runner(model, input_spec, classes)
    raise CifarlabError(f"cannot diagnose a {type(model).__name__}: expected a .safetensors or .onnx "
                        "path, a cifarlab Classifier, a torch nn.Module or a callable returning logits")
