"""The `cifarlab` command: a thin argparse layer over the Python API.

Exit status: 0 success, 2 bad usage or input (argparse's convention, kept for our own
validation errors too), 130 interrupted. Tracebacks are shown only with --debug.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
import sys
import tempfile
import typing
from pathlib import Path
from typing import Any, NoReturn

from cifarlab import __version__
from cifarlab.choices import BAD_IMAGE_POLICIES, CM_SCALES, SPLITS, TTA_MODES
from cifarlab.config import TrainConfig
from cifarlab.errors import CifarlabError, StorageError, TrainingInterrupted

# The train flags left unset take the chosen model's recipe, which `cifarlab models` lists.
RECIPE_DEFAULT = "default: the model's recipe, see `cifarlab models`"
PREPROCESSING_HELP = ("for a Keras file (or an ONNX file from another tool) that does not record its input "
                      "scaling: what your training script did to the 0..255 pixels: scale (x / 255), "
                      "standardize:MEAN:STD (e.g. standardize:0.507,0.487,0.441:0.267,0.256,0.276, on x / 255) "
                      "or none. Not needed when the model starts with a Rescaling/Normalization layer")
MODEL_FILES = ("a model.safetensors written by `cifarlab train`, an .onnx file, or a Keras .keras/.h5 "
               "file (Keras 3 on PyTorch, safe mode: pip install 'cifarlab[keras]')")
DATA_HELP = ("cifar100, cifar10, or a path: an official CIFAR python archive (.tar.gz) or its "
             "extracted folder, or an ImageFolder dataset (train/<class>/*.png, test/<class>/*) "
             "as a folder, .tar.gz or .zip")


def preprocessing_arg(text: str) -> str:
    """--preprocessing, checked while the arguments are parsed (before any data is loaded)."""
    from cifarlab.runner import parse_preprocessing

    try:
        parse_preprocessing(text)
    except CifarlabError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--preprocessing ")) from None
    return text


class Parser(argparse.ArgumentParser):
    """argparse, and a mistyped option names the close ones (Python 3.14's suggest_on_error)."""

    def error(self, message: str) -> NoReturn:
        if message.startswith("unrecognized arguments:"):
            known = [flag for action in self._actions for flag in action.option_strings]
            typed = [word.split("=")[0] for word in message.split(":", 1)[1].split() if word.startswith("--")]
            close = sorted({match for word in typed for match in difflib.get_close_matches(word, known, n=2)})
            if close:
                message += f" (did you mean {' or '.join(close)}?)"
        super().error(message)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="cifarlab", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"cifarlab {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_demo_command(commands)
    add_data_command(commands)
    add_train_command(commands)
    add_evaluate_command(commands)
    add_predict_command(commands)
    add_diagnose_command(commands)
    add_report_command(commands)
    add_export_command(commands)
    commands.add_parser("models", help="list the model architectures").set_defaults(run=run_models)
    for command in commands.choices.values():  # `cifarlab train --debug ...` works too
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="show full tracebacks")
    return parser


def add_data_options(parser: argparse.ArgumentParser, default: str | None) -> None:
    parser.add_argument("--data", default=default, help=DATA_HELP + (f" (default: {default})" if default else ""))
    parser.add_argument("--no-verify", action="store_true",
                        help="accept an official archive whose MD5 differs (a deliberately modified copy)")
    add_image_options(parser)


def add_image_options(parser: argparse.ArgumentParser) -> None:
    """How ImageFolder images that are not 32x32, or cannot be decoded, are imported."""
    parser.add_argument("--resize", action="store_true", help="resize ImageFolder images that are not 32x32")
    parser.add_argument("--bad-images", choices=BAD_IMAGE_POLICIES, default="refuse",
                        help="ImageFolder images that cannot be decoded: refuse (stop and name the file; "
                             "default) or skip (leave them out and list them)")


def add_demo_command(commands) -> None:
    p = commands.add_parser(
        "demo", help="start here: train a small model, evaluate it right and with the classic "
                     "forgotten /255, diagnose the difference, write an HTML report",
        description="The bug cifarlab exists for, in one command: writes OUT/report.html with both "
                    "confusion matrices and the diagnosis that explains them.")
    p.add_argument("--data", default="cifar100", help=DATA_HELP + " (default: cifar100, downloaded)")
    p.add_argument("--out", type=Path, default=Path("demo"), help="output folder (default: demo)")
    p.add_argument("--time-budget", type=float, default=3.0, metavar="MINUTES",
                   help="minutes of training (default 3)")
    p.add_argument("--max-train-images", type=int, metavar="N",
                   help="train on a class-balanced subset of N images (default: 20,000, or fewer, so "
                        "that whole epochs, at least 4, fill the budget on this machine; 50000: all)")
    p.add_argument("--quiet", action="store_true", help="no progress; only the summary")
    p.set_defaults(run=run_demo)


def add_data_command(commands) -> None:
    p = commands.add_parser("data", help="download or import a dataset into the local cache")
    p.add_argument("data", nargs="?", default="cifar100", help=DATA_HELP)
    p.add_argument("--no-verify", action="store_true", help="skip the MD5 check of official archives")
    add_image_options(p)
    p.set_defaults(run=run_data)


def add_config_flags(parser: argparse.ArgumentParser, config: type) -> None:
    """One option per field of a config dataclass, named after it, with the help, choices and
    metavar its `flag` metadata gives; a field left None takes the model's recipe. Booleans
    become --x / --no-x (True by default: just --no-x)."""
    hints = typing.get_type_hints(config)
    for item in dataclasses.fields(config):
        meta = item.metadata
        if not meta.get("cli", True):
            continue
        name, kind = "--" + item.name.replace("_", "-"), hints[item.name]
        if item.default is None:
            default = RECIPE_DEFAULT if meta.get("recipe", True) else "default: off"
        else:
            default = f"default: {item.default}"
        help_text = f"{meta.get('help', '')} ({default})".strip()
        if kind in (bool, bool | None):
            if item.default is True:  # on unless turned off
                parser.add_argument("--no-" + name[2:], dest=item.name, action="store_false",
                                    help=f"no {meta.get('help', '')} (default: on)")
            elif item.default is False:
                parser.add_argument(name, action="store_true", help=f"{meta.get('help', '')} (default: off)")
            else:
                parser.add_argument(name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
            continue
        scalar = next(t for t in (int, float, str) if kind in (t, t | None))
        parser.add_argument(name, type=scalar, default=item.default, choices=meta.get("choices"),
                            metavar=meta.get("metavar"), help=help_text)


def add_train_command(commands) -> None:
    p = commands.add_parser("train", help="train a model; writes a run folder with model.safetensors")
    add_data_options(p, "cifar100")
    add_config_flags(p, TrainConfig)
    p.add_argument("--out", type=Path, help="run folder (default runs/<data>-<model>-<time>)")
    p.add_argument("--resume", type=Path, metavar="RUN", help="continue the run in this folder")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run in --out (its model, checkpoint, history and eval-* folders); "
                        "without it a folder holding a run is refused")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=run_train)


def add_evaluate_command(commands) -> None:
    p = commands.add_parser("evaluate", help="metrics, cm.json and confusion_matrix.png for a model")
    p.add_argument("model", type=Path, help=MODEL_FILES + "; a file from another tool needs --data "
                   "(its class names)")
    add_data_options(p, None)
    p.add_argument("--preprocessing", metavar="SPEC", type=preprocessing_arg, help=PREPROCESSING_HELP)
    p.add_argument("--split", choices=SPLITS, default="test",
                   help="test: the official test set (default); val: the split the run held out")
    p.add_argument("--tta", choices=TTA_MODES,
                   help="test-time augmentation: average the logits over each image and its mirror "
                        "(flip), and also over 1-pixel shifts (flip+translate)")
    p.add_argument("--out", type=Path, help="output folder (default: next to the model, named by the model file, "
                                            "split and TTA: eval-model-test)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace another evaluation in --out (the same evaluation run again is replaced anyway)")
    p.add_argument("--report", type=Path, metavar="HTML",
                   help="also write a self-contained HTML report (with the run's history.csv if it "
                        "sits next to the model)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=run_evaluate)


def add_predict_command(commands) -> None:
    p = commands.add_parser("predict", help="classify image files (PNG/JPEG)")
    p.add_argument("model", type=Path, help=MODEL_FILES)
    p.add_argument("images", type=Path, nargs="+", help="PNG or JPEG files")
    p.add_argument("--data", help="for a model file that does not record its classes (Keras, other tools' "
                                  "ONNX): the dataset it was trained on, which names them (" + DATA_HELP + ")")
    p.add_argument("--preprocessing", metavar="SPEC", type=preprocessing_arg, help=PREPROCESSING_HELP)
    p.add_argument("--top", type=int, default=5, help="classes listed per image (default 5)")
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
    p.add_argument("--model", metavar="MODEL", help="a cifarlab model.safetensors, any .onnx classifier, or a "
                   "Keras .keras/.h5 file (pip install 'cifarlab[keras]')")
    p.add_argument("--images", type=Path, metavar="FILE",
                   help="the images exactly as you fed them to the model (.npy/.npz)")
    p.add_argument("--data", help="with --model and no --images: a dataset (" + DATA_HELP + ")")
    p.add_argument("--split", choices=SPLITS, default="test")
    p.add_argument("--max-images", type=int, default=2000, help="images per probe (default 2000)")
    p.add_argument("--resize", action="store_true",
                   help="resize --images (or --data ImageFolder images) of another size to the model's, "
                        "keeping their dtype, scale and layout")
    p.add_argument("--json", action="store_true", help="print the machine-readable document")
    p.add_argument("--plot", type=Path, metavar="DIR", help="write confusion_matrix.png and class_histogram.png")
    p.add_argument("--report", type=Path, metavar="HTML",
                   help="also write a self-contained HTML report of the findings and the confusion matrix")
    p.set_defaults(run=run_diagnose)


def add_report_command(commands) -> None:
    p = commands.add_parser(
        "report", help="a self-contained HTML report of evaluations (side by side) and a diagnosis",
        description="One .html file with every figure embedded: headline metrics, confusion matrices, "
                    "class histograms, per-class accuracy, the most-confused pairs with example images, "
                    "training curves and the diagnosis' findings. No scripts, no network needed to view it.")
    p.add_argument("evaluations", type=Path, nargs="*", metavar="EVAL_DIR",
                   help="folders written by `cifarlab evaluate` (several are shown side by side)")
    p.add_argument("--diagnosis", type=Path, metavar="DIAG_JSON", help="the output of `cifarlab diagnose --json`")
    p.add_argument("--history", type=Path, metavar="CSV", help="a run's history.csv: draw the training curves")
    p.add_argument("--cm-scale", choices=CM_SCALES, default="linear",
                   help="colour scale of the confusion matrices (log shows small confusions)")
    p.add_argument("--mask-diagonal", action="store_true",
                   help="grey out the correct predictions so the colours show only the mistakes")
    p.add_argument("--title", help="the page title")
    p.add_argument("--out", type=Path, required=True, metavar="HTML", help="the .html file to write")
    p.set_defaults(run=run_report)


def add_export_command(commands) -> None:
    p = commands.add_parser("export", help="write an ONNX file with the preprocessing inside")
    p.add_argument("model", type=Path, help="a model.safetensors written by `cifarlab train`, or a Keras "
                   ".keras/.h5 file to seal (with --preprocessing unless it starts with Rescaling/Normalization)")
    p.add_argument("--preprocessing", metavar="SPEC", type=preprocessing_arg, help=PREPROCESSING_HELP)
    p.add_argument("--data", help="for a Keras file: the dataset it was trained on, whose class names go into "
                                  "the ONNX metadata (" + DATA_HELP + ")")
    p.add_argument("--onnx", type=Path, required=True, metavar="OUT", help="the .onnx file to write")
    p.add_argument("--onnx-float", action="store_true",
                   help="float NHWC input, preprocessed by the caller as the metadata says "
                        "(for runtimes without uint8 inputs); default: raw uint8 NHWC 0..255")
    p.set_defaults(run=run_export)


# ---- command bodies -------------------------------------------------------------------------

def run_demo(args) -> int:
    from cifarlab.demo import format_summary, run_demo

    subset = {} if args.max_train_images is None else {"max_train_images": args.max_train_images}
    summary = run_demo(args.data, args.out, args.time_budget, progress=not args.quiet, **subset)
    if args.quiet:
        print(format_summary(summary))
    return 0


def run_data(args) -> int:
    from cifarlab.data import load_dataset

    ds = load_dataset(args.data, verify=not args.no_verify, resize=args.resize, bad_images=args.bad_images)
    print(f"{ds.name}: {len(ds.train_y):,} train + {len(ds.test_y):,} test images "
          f"{ds.train_x.shape[1]}x{ds.train_x.shape[2]}, {len(ds.classes)} classes "
          f"({', '.join(ds.classes[:5])}{', ...' if len(ds.classes) > 5 else ''})")
    if ds.coarse_classes:
        print(f"  {len(ds.coarse_classes)} coarse classes")
    print(f"  from {ds.source}")
    if ds.skipped:
        print(f"  left out {len(ds.skipped):,} images that could not be decoded:")
        print("\n".join(f"    {where}" for where in ds.skipped))
    return 0


def run_train(args) -> int:
    progress = not args.quiet
    try:
        result = _train_or_resume(args, progress)
    except StorageError as exc:
        run = Path(str(exc.path)).parent if exc.path else None
        if run is None or not (run / "checkpoint.safetensors").is_file():
            raise
        raise StorageError(f"{exc} Training stopped; once there is room, continue with: "
                           f"cifarlab train --resume {run}") from None
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 alone reports
        return 0
    metrics = result.model.meta["metrics"]
    from cifarlab.text import plural

    print(f"trained {plural(metrics['epochs'], 'epoch')} in {metrics['train_seconds']:.0f}s; "
          + (f"val accuracy {metrics['val_acc']:.1%}" if metrics.get("val_acc") is not None else "no val split"))
    print(f"model: {result.model_path}\nnext:  cifarlab evaluate {result.model_path} --split test")
    return 0


def _train_or_resume(args, progress: bool):
    from cifarlab.data import load_dataset
    from cifarlab.training import pick_device, resume, train

    if args.resume:
        return resume(args.resume, dataset=_resume_dataset(args, progress), epochs=args.epochs, progress=progress)
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                         if hasattr(args, f.name)})
    cfg.validate()  # before a possibly long download
    pick_device(cfg.device)
    dataset = load_dataset(args.data, verify=not args.no_verify, progress=progress, resize=args.resize,
                           bad_images=args.bad_images)
    return train(cfg, dataset=dataset, run_dir=args.out, progress=progress, overwrite=args.overwrite)


def _resume_dataset(args, progress: bool):
    """The run's dataset loaded with --resize/--bad-images as given; None: resume() loads it as
    the checkpoint's config recorded (runs from before cifarlab recorded these options need
    the flags again)."""
    if not args.resize and args.bad_images == "refuse":
        return None
    from cifarlab.data import load_dataset
    from cifarlab.training import read_checkpoint

    checkpoint = args.resume / "checkpoint.safetensors" if args.resume.is_dir() else args.resume
    data = read_checkpoint(checkpoint)[1].get("config", {}).get("data")
    if not isinstance(data, str):
        raise CifarlabError(f"{checkpoint} does not say which dataset the run was trained on")
    return load_dataset(data, progress=progress, resize=args.resize, bad_images=args.bad_images)


def run_evaluate(args) -> int:
    from cifarlab.data import load_dataset
    from cifarlab.evaluation import evaluate
    from cifarlab.formats import check_model_file
    from cifarlab.metrics import format_report

    check_model_file(args.model)
    data = load_dataset(args.data, verify=not args.no_verify, progress=not args.quiet, resize=args.resize,
                        bad_images=args.bad_images) if args.data else None
    result = evaluate(args.model, data=data, split=args.split, out_dir=args.out, progress=not args.quiet,
                      tta=args.tta, preprocessing=args.preprocessing, overwrite=args.overwrite)
    if result.model and result.model.expects:
        print(f"model: {result.model.architecture}: {result.model.expects}")
    print(format_report(result))
    if args.tta:
        print(f"test-time augmentation: {args.tta}")
    print(f"\nwrote metrics.json, cm.json, confusion_matrix.png to {result.out_dir}")
    if args.report:
        from cifarlab.report import write_report

        history = args.model.parent / "history.csv"  # the run folder of a `cifarlab train` model
        path = write_report(args.report, evaluations=[result], history=history if history.is_file() else None)
        print(f"report: {path}")
    return 0


def run_predict(args) -> int:
    from cifarlab.formats import check_model_file, open_predictor
    from cifarlab.predict import predict_files
    from cifarlab.runner import parse_preprocessing

    check_model_file(args.model)
    stated = parse_preprocessing(args.preprocessing) if args.preprocessing else None
    model = open_predictor(args.model, args.data, stated)
    results = predict_files(model, args.images, top=args.top, resize=args.resize)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    for result in results:
        best = ", ".join(f"{t['class']} {t['probability']:.1%}" for t in result["top"])
        print(f"{result['path']}: {best}")
    return 0


def run_diagnose(args) -> int:
    from cifarlab.diagnosis import diagnose
    from cifarlab.formats import check_model_file

    if args.model is not None:
        check_model_file(args.model)

    with tempfile.TemporaryDirectory(prefix="cifarlab-diagnose-") as scratch:
        # The report embeds the plots the diagnosis draws (the matrix it analysed), so draw them.
        plot_dir = args.plot or (Path(scratch) if args.report else None)
        diagnosis = diagnose(confusion=args.confusion, predictions=args.predictions, labels=args.labels,
                             model=args.model, images=args.images, data=args.data, split=args.split,
                             max_images=args.max_images, plot_dir=plot_dir, resize=args.resize)
        print(diagnosis.to_json() if args.json else diagnosis.format_text())
        if args.report:
            from cifarlab.report import write_report

            write_report(args.report, evaluations=[], diagnosis=diagnosis, diagnosis_plots=plot_dir)
    if args.plot and not args.json:
        print(f"\nplots in {args.plot}")
    if args.report and not args.json:
        print(f"report: {args.report}")
    return diagnosis.exit_code


def run_report(args) -> int:
    from cifarlab.report import write_report

    path = write_report(args.out, evaluations=args.evaluations, diagnosis=args.diagnosis, history=args.history,
                        title=args.title, cm_scale=args.cm_scale, mask_diagonal=args.mask_diagonal)
    print(f"report: {path}")
    return 0


def run_export(args) -> int:
    from cifarlab.export import check_onnx_path, export_onnx
    from cifarlab.formats import check_model_file

    check_onnx_path(args.onnx)  # both paths before any work
    check_model_file(args.model)

    info = export_onnx(args.model, args.onnx, input="float" if args.onnx_float else "uint8",
                       preprocessing=args.preprocessing, data=args.data)
    compared = "logit" if info["reference"] == "PyTorch" else "output"
    print(f"wrote {info['path']} ({info['input']} NHWC input); onnxruntime vs {info['reference']}: "
          f"max abs {compared} difference {info['max_abs_diff']:.2e}")
    return 0


def run_models(args) -> int:
    from cifarlab.models import get_model_spec, list_models

    for name in list_models():
        spec = get_model_spec(name)
        print(f"{name:16s} {spec.description} [preprocessing: {spec.preprocessing}]")
        recipe = " ".join(f"{key}={value}" for key, value in spec.recipe.items())
        many = " ".join(f"{key}={value}" for key, value in spec.many_class_recipe.items())
        print(f"{'':16s} recipe: {recipe}" + (f"; for more than 10 classes: {many}" if many else ""))
    return 0


class ReaderMayLeave:
    """sys.stdout while a command runs: when its reader leaves (`cifarlab diagnose ... | head`),
    the rest of the output goes to /dev/null and the command ends with its own exit status,
    not an error about the pipe."""

    def __init__(self, stream: Any):
        self.stream = stream

    def write(self, text: str) -> int:
        try:
            return self.stream.write(text)
        except BrokenPipeError:
            self._discard_the_rest()
            return len(text)

    def flush(self) -> None:
        try:
            self.stream.flush()
        except BrokenPipeError:
            self._discard_the_rest()

    def _discard_the_rest(self) -> None:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self.stream.fileno())
        os.close(devnull)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def main(argv: list[str] | None = None) -> int:
    stdout = sys.stdout
    sys.stdout = ReaderMayLeave(stdout)
    try:
        return run_command(argv)
    finally:
        sys.stdout.flush()  # here, where a reader that left is handled, not at exit
        sys.stdout = stdout


def run_command(argv: list[str] | None) -> int:
    # Keras files run on Keras 3's PyTorch backend; this process is cifarlab's, so a
    # KERAS_BACKEND=tensorflow meant for the user's own scripts does not apply here.
    os.environ["KERAS_BACKEND"] = "torch"
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # reported by the subcommand's parser, which knows its own flags to suggest
        subcommands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        subcommands.choices[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return args.run(args)
    except CifarlabError as exc:
        if args.debug:
            raise
        print(f"cifarlab: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the environment, not a bug: a full disk, a permission, a vanished file
        if args.debug:
            raise
        from cifarlab.fileio import describe_os_error

        print(f"cifarlab: error: {describe_os_error(exc)}", file=sys.stderr)
        return 2
    except TrainingInterrupted as exc:
        print(f"\ncifarlab: interrupted; {exc.hint()}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("\ncifarlab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
