"""The `cifarlab` command: a thin argparse layer over the Python API.

Exit status: 0 success, 2 bad usage or input (argparse's convention, kept for our own
validation errors too), 130 interrupted. Tracebacks are shown only with --debug.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from cifarlab import __version__
from cifarlab.errors import CifarlabError

DATA_HELP = ("cifar100, cifar10, or a path: an official CIFAR python archive (.tar.gz) or its "
             "extracted folder, or an ImageFolder dataset (train/<class>/*.png, test/<class>/*) "
             "as a folder, .tar.gz or .zip")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cifarlab", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"cifarlab {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_data_command(commands)
    add_train_command(commands)
    add_evaluate_command(commands)
    add_predict_command(commands)
    add_diagnose_command(commands)
    add_export_command(commands)
    commands.add_parser("models", help="list the model architectures").set_defaults(run=run_models)
    return parser


def add_data_options(parser: argparse.ArgumentParser, default: str | None) -> None:
    parser.add_argument("--data", default=default, help=DATA_HELP + (f" (default: {default})" if default else ""))
    parser.add_argument("--no-verify", action="store_true",
                        help="accept an official archive whose MD5 differs (a deliberately modified copy)")


def add_data_command(commands) -> None:
    p = commands.add_parser("data", help="download or import a dataset into the local cache")
    p.add_argument("data", nargs="?", default="cifar100", help=DATA_HELP)
    p.add_argument("--no-verify", action="store_true", help="skip the MD5 check of official archives")
    p.add_argument("--resize", action="store_true", help="resize ImageFolder images that are not 32x32")
    p.set_defaults(run=run_data)


def add_train_command(commands) -> None:
    p = commands.add_parser("train", help="train a model; writes a run folder with model.safetensors")
    add_data_options(p, "cifar100")
    p.add_argument("--model", default="auto", help="architecture (see `cifarlab models`); auto: "
                   "airbench on a GPU, airbench-small on a CPU")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--optimizer", choices=["sgd", "adam"])
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--schedule", choices=["onecycle", "cosine", "constant"])
    p.add_argument("--label-smoothing", type=float)
    p.add_argument("--translate", type=int, help="max random shift in pixels")
    p.add_argument("--no-flip", action="store_true", help="no random horizontal flips")
    p.add_argument("--val-fraction", type=float, default=0.2, help="held-out share of train (default 0.2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--amp", choices=["auto", "on", "off"], default="auto", help="bf16 autocast")
    p.add_argument("--max-train-images", type=int, help="train on a class-balanced subset (quick runs)")
    p.add_argument("--time-budget", type=float, metavar="MINUTES",
                   help="choose the number of epochs (instead of --epochs) so that training, "
                        "validation and a final test evaluation fit in this many minutes, "
                        "from step times measured on this machine")
    p.add_argument("--ema", type=float, metavar="DECAY",
                   help="validate and save a moving average of the weights (e.g. 0.999; it "
                        "averages over about 1/(1-DECAY) steps, so keep that well under the run's steps)")
    p.add_argument("--out", type=Path, help="run folder (default runs/<data>-<model>-<time>)")
    p.add_argument("--resume", type=Path, metavar="RUN", help="continue the run in this folder")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=run_train)


def add_evaluate_command(commands) -> None:
    p = commands.add_parser("evaluate", help="metrics, cm.json and confusion_matrix.png for a model")
    p.add_argument("model", type=Path, help="a model.safetensors written by `cifarlab train`")
    add_data_options(p, None)
    p.add_argument("--split", choices=["val", "test"], default="test")
    p.add_argument("--tta", choices=["flip", "flip+translate"],
                   help="test-time augmentation: average the logits over each image and its mirror "
                        "(flip), and also over 1-pixel shifts (flip+translate)")
    p.add_argument("--out", type=Path, help="output folder (default: next to the model)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(run=run_evaluate)


def add_predict_command(commands) -> None:
    p = commands.add_parser("predict", help="classify image files (PNG/JPEG)")
    p.add_argument("model", type=Path)
    p.add_argument("images", type=Path, nargs="+")
    p.add_argument("--top", type=int, default=5)
    p.add_argument("--resize", action="store_true", help="resize images that are not the model's size")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(run=run_predict)


def add_diagnose_command(commands) -> None:
    p = commands.add_parser(
        "diagnose", help="explain why a classifier mainly predicts a few classes",
        description="Give what you have: a confusion matrix, predictions (+ labels), or a model "
                    "with the images you fed it. Exit status: 0 healthy, 1 problem found, 2 bad input.")
    p.add_argument("--confusion", type=Path, metavar="CM", help="cm.json: a list of rows, row = true class")
    p.add_argument("--predictions", type=Path, metavar="FILE",
                   help="probabilities or logits (N, C), or class ids (N,): .npy, .npz or .csv")
    p.add_argument("--labels", type=Path, metavar="FILE", help="true class ids (N,) or one-hot (N, C)")
    p.add_argument("--model", metavar="MODEL", help="a cifarlab model.safetensors or any .onnx classifier")
    p.add_argument("--images", type=Path, metavar="FILE",
                   help="the images exactly as you fed them to the model (.npy/.npz)")
    p.add_argument("--data", help="with --model and no --images: a dataset (" + DATA_HELP + ")")
    p.add_argument("--split", choices=["val", "test"], default="test")
    p.add_argument("--max-images", type=int, default=2000, help="images per probe (default 2000)")
    p.add_argument("--json", action="store_true", help="print the machine-readable document")
    p.add_argument("--plot", type=Path, metavar="DIR", help="write confusion_matrix.png and class_histogram.png")
    p.set_defaults(run=run_diagnose)


def add_export_command(commands) -> None:
    p = commands.add_parser("export", help="write an ONNX file with the preprocessing inside")
    p.add_argument("model", type=Path, help="a model.safetensors written by `cifarlab train`")
    p.add_argument("--onnx", type=Path, required=True, metavar="OUT", help="the .onnx file to write")
    p.add_argument("--onnx-float", action="store_true",
                   help="float NHWC input, preprocessed by the caller as the metadata says "
                        "(for runtimes without uint8 inputs); default: raw uint8 NHWC 0..255")
    p.set_defaults(run=run_export)


# ---- command bodies -------------------------------------------------------------------------

def run_data(args) -> int:
    from cifarlab.data import load_dataset

    ds = load_dataset(args.data, verify=not args.no_verify, resize=args.resize)
    print(f"{ds.name}: {len(ds.train_y):,} train + {len(ds.test_y):,} test images "
          f"{ds.train_x.shape[1]}x{ds.train_x.shape[2]}, {len(ds.classes)} classes "
          f"({', '.join(ds.classes[:5])}{', ...' if len(ds.classes) > 5 else ''})")
    if ds.coarse_classes:
        print(f"  {len(ds.coarse_classes)} coarse classes")
    print(f"  from {ds.source}")
    return 0


def run_train(args) -> int:
    from cifarlab.data import load_dataset
    from cifarlab.training import TrainConfig, pick_device, resume, train

    progress = not args.quiet
    if args.resume:
        result = resume(args.resume, epochs=args.epochs, progress=progress)
    else:
        cfg = TrainConfig(
            data=args.data, model=args.model, epochs=args.epochs, batch_size=args.batch_size,
            optimizer=args.optimizer, lr=args.lr, weight_decay=args.weight_decay,
            schedule=args.schedule, label_smoothing=args.label_smoothing,
            translate=args.translate, flip=not args.no_flip, val_fraction=args.val_fraction,
            seed=args.seed, device=args.device, amp=args.amp,
            max_train_images=args.max_train_images, time_budget=args.time_budget, ema=args.ema,
        )
        cfg.validate()  # before a possibly long download
        pick_device(cfg.device)
        dataset = load_dataset(args.data, verify=not args.no_verify, progress=progress)
        result = train(cfg, dataset=dataset, run_dir=args.out, progress=progress)
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 alone reports
        return 0
    metrics = result.model.meta["metrics"]
    print(f"trained {metrics['epochs']} epochs in {metrics['train_seconds']:.0f}s; "
          + (f"val accuracy {metrics['val_acc']:.1%}" if metrics.get("val_acc") is not None else "no val split"))
    print(f"model: {result.model_path}\nnext:  cifarlab evaluate {result.model_path} --split test")
    return 0


def run_evaluate(args) -> int:
    from cifarlab.data import load_dataset
    from cifarlab.evaluation import evaluate
    from cifarlab.metrics import format_report

    data = load_dataset(args.data, verify=not args.no_verify, progress=not args.quiet) if args.data else None
    report = evaluate(args.model, data=data, split=args.split, out_dir=args.out, progress=not args.quiet,
                      tta=args.tta)
    print(format_report(report))
    if args.tta:
        print(f"test-time augmentation: {args.tta}")
    print(f"\nwrote metrics.json, cm.json, confusion_matrix.png to {report['out_dir']}")
    return 0


def run_predict(args) -> int:
    from cifarlab.modelfile import load_model
    from cifarlab.predict import predict_files

    results = predict_files(load_model(args.model), args.images, top=args.top, resize=args.resize)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    for result in results:
        best = ", ".join(f"{t['class']} {t['probability']:.1%}" for t in result["top"])
        print(f"{result['path']}: {best}")
    return 0


def run_diagnose(args) -> int:
    from cifarlab.diagnosis import diagnose

    if args.model is None and (args.images is not None or args.data is not None):
        raise CifarlabError("--images and --data need --model: which model was fed these images?")
    if args.model is not None and args.predictions is not None:
        raise CifarlabError("give either --model (cifarlab runs it) or --predictions (outputs you already have)")
    diagnosis = diagnose(confusion=args.confusion, predictions=args.predictions, labels=args.labels,
                         model=args.model, images=args.images, data=args.data, split=args.split,
                         max_images=args.max_images, plot_dir=args.plot)
    print(diagnosis.to_json() if args.json else diagnosis.format_text())
    if args.plot and not args.json:
        print(f"\nplots in {args.plot}")
    return diagnosis.exit_code


def run_export(args) -> int:
    from cifarlab.export import export_onnx

    info = export_onnx(args.model, args.onnx, input="float" if args.onnx_float else "uint8")
    print(f"wrote {info['path']} ({info['input']} NHWC input); onnxruntime vs PyTorch: "
          f"max abs logit difference {info['max_abs_diff']:.2e}")
    return 0


def run_models(args) -> int:
    from cifarlab.models import get_model_spec, list_models

    for name in list_models():
        spec = get_model_spec(name)
        print(f"{name:16s} {spec.description} [preprocessing: {spec.preprocessing}]")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except CifarlabError as exc:
        if args.debug:
            raise
        print(f"cifarlab: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = " (continue with `cifarlab train --resume` and the run folder printed above)" if args.command == "train" else ""
        print(f"\ncifarlab: interrupted{hint}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
