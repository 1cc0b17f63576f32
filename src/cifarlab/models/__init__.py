"""Model registry: architecture name -> builder, plus the data config each model carries.

As in timm, a model's preprocessing is part of its definition, not something the user
remembers: `preprocessing="scale"` divides raw pixels by 255 (what the seed's Keras
script did), `"standardize"` subtracts the training split's per-channel mean and divides
by its std. Either way it runs inside the model's forward pass (see cifarlab.modelfile).
Each entry also carries the training recipe it was designed for, which `cifarlab train`
uses unless told otherwise.
"""

# Importing the modules registers their models.
from cifarlab.models import airbench, keras_cnn  # noqa: E402,F401
from cifarlab.models.registry import ModelSpec, create_model, get_model_spec, list_models, register_model

__all__ = ["ModelSpec", "create_model", "get_model_spec", "list_models", "register_model"]
