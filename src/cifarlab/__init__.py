"""cifarlab: train, evaluate and diagnose CIFAR classifiers whose preprocessing travels with the model.

The pipeline, one module per job:
    data       -> load_dataset, get_split         (archives, ImageFolder, cache, split)
    models     -> create_model, list_models       (architecture registry)
    modelfile  -> load_model, save_model          (safetensors + metadata; uint8 NHWC contract)
    training   -> train, resume, TrainConfig      (training loop, run folders)
    evaluation -> evaluate                        (metrics.json, cm.json, confusion_matrix.png)
    results    -> EvaluationResult                (the evaluation record and its folder)
    diagnosis  -> diagnose                        (why a model predicts only a few classes)
    report     -> write_report                    (a self-contained HTML report)
    export     -> export_onnx                     (ONNX with the preprocessing inside)
    formats    -> load_model, open_model          (every model format: cifarlab, ONNX, Keras)
"""

__version__ = "0.1.0"

from cifarlab.errors import CifarlabError, InputError  # noqa: E402

_SUBMODULES = {"data", "models", "modelfile", "training", "evaluation", "diagnosis", "report", "export",
               "metrics", "plots", "demo", "predict", "cli", "formats", "runner", "onnx", "keras", "results",
               "schema", "config"}


def __getattr__(name: str):
    # Lazy imports keep `import cifarlab` (and the CLI's --help) fast: torch loads on first use.
    import importlib

    homes = {
        "load_dataset": "cifarlab.data", "get_split": "cifarlab.data", "Dataset": "cifarlab.data",
        "load_model": "cifarlab.formats", "save_model": "cifarlab.modelfile",
        "Classifier": "cifarlab.modelfile",
        "create_model": "cifarlab.models", "list_models": "cifarlab.models",
        "train": "cifarlab.training", "resume": "cifarlab.training", "TrainConfig": "cifarlab.training",
        "evaluate": "cifarlab.evaluation", "EvaluationResult": "cifarlab.results", "diagnose": "cifarlab.diagnosis",
        "export_onnx": "cifarlab.export", "write_report": "cifarlab.report",
    }
    if name in homes:
        return getattr(importlib.import_module(homes[name]), name)
    if name in _SUBMODULES:  # `cifarlab.demo.run_demo(...)` after a plain `import cifarlab`
        return importlib.import_module(f"cifarlab.{name}")
    raise AttributeError(f"module 'cifarlab' has no attribute {name!r}")


__all__ = ["CifarlabError", "InputError", "load_dataset", "get_split", "Dataset", "load_model",
           "save_model", "Classifier", "create_model", "list_models", "train", "resume",
           "TrainConfig", "evaluate", "EvaluationResult", "diagnose", "export_onnx", "write_report"]
