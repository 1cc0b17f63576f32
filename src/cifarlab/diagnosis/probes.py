"""Find the cause of bad predictions by re-running the model under candidate corrections.

A probe is a transform of the user's images that undoes one classic mistake (a missing or
doubled /255, the wrong mean/std, BGR, NCHW, CIFAR's planar rows reshaped without a
transpose). If the model does much better on the transformed images than on the images as
given, that mistake is the cause, and the transform is the fix. This needs no knowledge of
how the model was trained, so it works for ONNX files and live models too; when the
training statistics are known (`runner.train_stats`), cifarlab.diagnosis.input_stats adds a
direct comparison of the inputs with them.

Adding a probe is one entry in `_ALL_PROBES` (with its precondition and fix where it has them).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cifarlab.diagnosis.collapse import prediction_stats
from cifarlab.diagnosis.report import Finding
from cifarlab.errors import InputError
from cifarlab.runner import ModelRunner, expected_shape, shape_fits

# Per-channel mean/std on the 0..1 scale. "cifar" is the average of the CIFAR-10 and
# CIFAR-100 training-set values (they differ by ~0.01, far below what a probe can tell).
CIFAR_MEAN, CIFAR_STD = (0.4993, 0.4844, 0.4437), (0.2572, 0.2500, 0.2689)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# Healthy/collapsed thresholds on the normalised entropy of predicted classes.
COLLAPSED_ENTROPY, HEALTHY_ENTROPY = 0.6, 0.8


# ---- the transforms ----------------------------------------------------------------------

def channel_axis(x: np.ndarray) -> int | None:
    """-1 for NHWC, 1 for NCHW, None when no axis holds 3 channels."""
    if x.ndim == 4 and x.shape[-1] == 3:
        return -1
    if x.ndim == 4 and x.shape[1] == 3:
        return 1
    return None


def _per_channel(values: tuple[float, ...], x: np.ndarray) -> np.ndarray:
    shape = (1, 1, 1, 3) if channel_axis(x) == -1 else (1, 3, 1, 1)
    return np.asarray(values, np.float32).reshape(shape)


def _unit(x: np.ndarray) -> np.ndarray:
    """Raw 0..255 pixels or 0..1 images, on the 0..1 scale."""
    return x / 255.0 if x.max() > 1.5 else x


def _standardize(mean: tuple[float, ...], std: tuple[float, ...]) -> Callable[[np.ndarray], np.ndarray]:
    return lambda x: (_unit(x) - _per_channel(mean, x)) / _per_channel(std, x)


def _unstandardize(mean: tuple[float, ...], std: tuple[float, ...]) -> Callable[[np.ndarray], np.ndarray]:
    # Gives a 0..1 image; run_probes brings it to the scale the model expects.
    return lambda x: x * _per_channel(std, x) + _per_channel(mean, x)


def _swap_rgb_bgr(x: np.ndarray) -> np.ndarray:
    return np.flip(x, axis=channel_axis(x) or -1)


def _undo_planar_reshape(x: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) made by reshaping CIFAR's planar rows (RRR..GGG..BBB) -> true NHWC."""
    n, h, w, c = x.shape
    return x.reshape(n, h * w * c).reshape(n, c, h, w).transpose(0, 2, 3, 1)


@dataclass(frozen=True)
class Seen:
    """What a probe's precondition looks at: the images' value range, which axis holds 3
    channels (-1, 1 or None) and the layout the model declares (None: unknown)."""

    lo: float
    hi: float
    axis: int | None
    layout: str | None


@dataclass(frozen=True)
class FixContext:
    """What a probe's fix is written from: the model's preprocessing record, the range it
    expects ("0..255", "0..1", "standardized"), how to bring a 0..1 image there, whether the
    given images are 0..255 pixels, and the model's layout."""

    pre: dict[str, Any]
    target: str
    unit_to_target: str
    pixels: bool
    layout: str | None


@dataclass(frozen=True)
class Probe:
    """One classic mistake and the transform of the user's images that undoes it.

    `finding`: the finding id a successful probe gives; `cause`: the title's first half,
    what was wrong; `action`: what the probe does, for "... raises accuracy from A to B";
    `mistake`: the mistake in a few words, for a finding that names two; `unit_output`: the
    transform gives a 0..1 image, which run_probes brings to the model's own range;
    `applies` and `skip_reason`: when the transform can be the fix at all (skipping the others
    saves time and removes chances of a lucky false positive); `fix`: the one line of code it
    stands for.
    """

    name: str
    transform: Callable[[np.ndarray], np.ndarray] = field(repr=False)
    finding: str = ""
    cause: str = ""
    action: str = ""
    mistake: str = ""
    unit_output: bool = False
    applies: Callable[[Seen], bool] = field(repr=False, default=lambda seen: True)
    skip_reason: str = ""
    fix: Callable[[FixContext], str] = field(repr=False, default=lambda context: "")

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.transform(x)

    @property
    def stage(self) -> int:
        """Where the correction goes in a pipeline: layout first, then channel order, then values."""
        return {"input-layout": 0, "channel-order": 1}.get(self.finding, 2)


def _unstandardize_probe(name: str, mean: tuple[float, ...], std: tuple[float, ...], which: str,
                         article: str) -> Probe:
    """Inputs normalised with (mean, std) in 0..1 units that the model was not trained on."""
    return Probe(name, _unstandardize(mean, std), "input-normalization",
                 f"Evaluation inputs are {which}-normalised, but the model was not trained that way",
                 "undoing the normalisation", f"{article} {which} normalisation the model was not trained on",
                 unit_output=True,
                 applies=lambda s: s.lo < 0 and s.hi <= 10, skip_reason="the values do not look standardised",
                 fix=lambda c: f"x = x * {_fmt(std)} + {_fmt(mean)}{c.unit_to_target}  "
                               f"# undo the {which} normalisation: the model expects {c.target}")


_ALL_PROBES = (
    Probe("as-given", lambda x: x),
    Probe("divide-by-255", lambda x: x / 255.0, "input-scale",
          "Evaluation inputs are 255x larger than the model expects", "dividing them by 255",
          "pixels not divided by 255",
          applies=lambda s: s.hi > 1.5, skip_reason="the values are not larger than 1",
          fix=lambda c: "x = x / 255.0  # the model was trained on pixels in 0..1"),
    Probe("multiply-by-255", lambda x: x * 255.0, "input-scale",
          "Evaluation inputs are 255x smaller than the model expects (/255 applied twice?)",
          "multiplying them by 255", "pixels divided by 255 twice",
          applies=lambda s: s.hi <= 1.5, skip_reason="the values exceed 1, so they are not scaled to 0..1",
          fix=lambda c: "x = x * 255.0  # /255 was applied twice; remove the extra division"),
    Probe("scale-to-minus1-1", lambda x: x / 127.5 - 1.0, "input-scale",
          "The model expects pixels scaled to -1..1, but got 0..255", "scaling them to -1..1",
          "pixels not scaled to -1..1",
          applies=lambda s: s.lo >= 0 and s.hi > 1.5, skip_reason="the values are not 0..255 pixels",
          fix=lambda c: "x = x / 127.5 - 1.0  # the model was trained on pixels in -1..1"),
    Probe("from-minus1-1", lambda x: (x + 1.0) / 2.0, "input-scale",
          "Evaluation inputs are scaled to -1..1, which the model was not trained on",
          "mapping them back from -1..1", "pixels scaled to -1..1", unit_output=True,
          applies=lambda s: -1.5 <= s.lo < 0 and s.hi <= 1.5, skip_reason="the values are not in -1..1",
          fix=lambda c: f"x = (x + 1.0) / 2.0{c.unit_to_target}  # the model expects {c.target}, not -1..1"),
    Probe("standardize-cifar", _standardize(CIFAR_MEAN, CIFAR_STD), "input-normalization",
          "The model expects standardised (mean/std-normalised) inputs, but they are not",
          "standardising them", "inputs not standardised",
          applies=lambda s: s.lo >= 0, skip_reason="the values are already centred (negative values)",
          fix=lambda c: _standardize_fix(c, CIFAR_MEAN, CIFAR_STD)),
    Probe("standardize-imagenet", _standardize(IMAGENET_MEAN, IMAGENET_STD), "input-normalization",
          "The model expects ImageNet-standardised inputs, but they are not", "standardising them",
          "inputs not ImageNet-standardised",
          applies=lambda s: s.lo >= 0, skip_reason="the values are already centred (negative values)",
          fix=lambda c: _standardize_fix(c, IMAGENET_MEAN, IMAGENET_STD)),
    _unstandardize_probe("unstandardize-cifar", CIFAR_MEAN, CIFAR_STD, "mean/std", "a"),
    _unstandardize_probe("unstandardize-imagenet", IMAGENET_MEAN, IMAGENET_STD, "ImageNet", "an"),
    Probe("swap-rgb-bgr", _swap_rgb_bgr, "channel-order",
          "Evaluation inputs are BGR, but the model was trained on RGB", "swapping the channels",
          "BGR instead of RGB",
          applies=lambda s: s.axis is not None, skip_reason="no axis holds 3 channels",
          fix=lambda c: ("x = x[..., ::-1]" if c.layout != "NCHW" else "x = x[:, ::-1]")
                        + "  # BGR -> RGB (e.g. images read with cv2.imread)"),
    Probe("nhwc-to-nchw", lambda x: x.transpose(0, 3, 1, 2), "input-layout",
          "Evaluation inputs are NHWC (channels last), but the model takes NCHW", "transposing them",
          "NHWC instead of NCHW",
          applies=lambda s: s.axis == -1 and s.layout != "NHWC",
          skip_reason="the images are not NHWC or the model takes NHWC",
          fix=lambda c: "x = x.transpose(0, 3, 1, 2)  # NHWC -> NCHW: the model takes channels first"),
    Probe("nchw-to-nhwc", lambda x: x.transpose(0, 2, 3, 1), "input-layout",
          "Evaluation inputs are NCHW (channels first), but the model takes NHWC", "transposing them",
          "NCHW instead of NHWC",
          applies=lambda s: s.axis == 1 and s.layout != "NCHW",
          skip_reason="the images are not NCHW or the model takes NCHW",
          fix=lambda c: "x = x.transpose(0, 2, 3, 1)  # NCHW -> NHWC: the model takes channels last"),
    Probe("undo-planar-reshape", _undo_planar_reshape, "input-layout",
          "Evaluation images were reshaped from CIFAR's planar rows without a transpose",
          "reshaping them correctly", "planar CIFAR rows reshaped without a transpose",
          applies=lambda s: s.axis == -1 and s.layout != "NCHW", skip_reason="the images are not NHWC",
          fix=lambda c: "x = rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  "
                        "# CIFAR rows are planar (all R, then G, then B)"),
)
# name -> probe. "as-given" is always first. Adding a probe is one entry above.
PROBES: dict[str, Probe] = {probe.name: probe for probe in _ALL_PROBES}


def _precondition(name: str, x: np.ndarray, runner: ModelRunner) -> str | None:
    """Why a probe makes no sense for these images (None: run it): its own rule, and for
    per-channel corrections an axis that holds 3 channels."""
    lo, hi = float(x.min()), float(x.max())
    axis, layout = channel_axis(x), runner.input_spec.get("layout")
    if axis is None and PROBES[name].finding in ("input-normalization", "channel-order"):
        return "no axis holds 3 channels"  # per-channel mean/std and RGB order need one
    probe = PROBES[name]
    return None if probe.applies(Seen(lo, hi, axis, layout)) else probe.skip_reason


def model_range(runner: ModelRunner) -> str | None:
    """What the model expects: "0..255", "0..1", "standardized", or None when unknown."""
    spec = runner.input_spec
    pre = spec.get("preprocessing") or {}
    if spec.get("dtype") == "uint8" or pre.get("applied_by") == "model":
        return "0..255"
    if pre.get("applied_by") == "caller":
        return "0..1" if pre.get("kind") == "scale" else "standardized"
    return None


def _to_model_range(unit_image: np.ndarray, runner: ModelRunner) -> np.ndarray:
    """A 0..1 image in the units the model takes (unknown: 0..1, the Keras/torchvision habit)."""
    target = model_range(runner)
    if target == "0..255":
        return unit_image * 255.0
    if target == "standardized":
        pre = runner.input_spec["preprocessing"]
        mean = _per_channel(tuple(pre["mean"]), unit_image)
        std = _per_channel(tuple(pre["std"]), unit_image)
        return (unit_image * 255.0 - mean) / std
    return unit_image


def _fits_model(x: np.ndarray, runner: ModelRunner) -> str | None:
    """Why `x` cannot be fed to the model (None: it can)."""
    spec = runner.input_spec
    if not shape_fits(x.shape, spec):
        return f"gives shape {tuple(x.shape[1:])} per image; the model takes {expected_shape(spec)}"
    if spec.get("dtype") == "uint8":
        lo, hi = float(x.min()), float(x.max())
        if lo < -1 or hi > 256:
            return f"gives values in [{lo:.3g}, {hi:.3g}], outside the 0..255 of a uint8 model"
        if hi < 2:
            return "gives values in 0..1, which a uint8 model would see as 0/1 pixels"
    return None


def _cast(x: np.ndarray, runner: ModelRunner) -> np.ndarray:
    if runner.input_spec.get("dtype") == "uint8":
        return np.clip(np.rint(x), 0, 255).astype(np.uint8)
    return x.astype(np.float32, copy=False)


# ---- running the probes ------------------------------------------------------------------

def sample_indices(n: int, max_images: int, seed: int = 0) -> np.ndarray:
    """A fixed, sorted sample: the same images every run, and not just the first class if sorted."""
    if n <= max_images:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, max_images, replace=False))


def run_probes(runner: ModelRunner, images: np.ndarray, labels: np.ndarray | None = None, *,
               max_images: int = 2000, as_given_logits: np.ndarray | None = None) -> list[dict[str, Any]]:
    """One row per probe: how the model does on the images under that correction.

    Rows: {"name", "accuracy" (None without labels), "pred_entropy", "classes_predicted",
    "mean_confidence", "agreement_with_as_given", "discordant_with_as_given" (with labels: the
    share of images right in one run and wrong in the other), "fix", "n_images"}, plus "skipped": reason
    for a probe that could not run. "as-given" is first. After the single probes come pairs
    ("divide-by-255+swap-rgb-bgr", with "steps"), for two mistakes made at once: the best
    single correction of each stage that moved the predictions, followed or preceded by each
    correction of another stage (see `_pairs`). A pair row also has "best_single" (the better
    of its two steps alone) and the agreement with its predictions. `as_given_logits`: the
    model's outputs on all the images as given, when the caller has them already (the
    as-given rows then reuse them instead of running the model again).
    """
    images = np.asarray(images)
    if labels is not None and len(labels) != len(images):
        raise InputError(f"got {len(images)} images but {len(labels)} labels")
    keep = sample_indices(len(images), max_images)
    given = images[keep]
    y = None if labels is None else np.asarray(labels)[keep]
    known = None if as_given_logits is None else np.asarray(as_given_logits)[keep]
    # Every probe first runs on a small screen sample; only those that moved the predictions
    # run again on the whole sample (most probes change nothing, and this halves the cost).
    screen = sample_indices(len(given), SCREEN_IMAGES, seed=1)
    rows = _probe_rows(runner, given[screen], None if y is None else y[screen],
                       known=None if known is None else known[screen])
    if len(screen) < len(given):
        again = _promising(rows, labels_given=y is not None)
        full = {row["name"]: row for row in _probe_rows(runner, given, y, only=again, known=known)}
        rows = [full.get(row["name"], row) for row in rows]
    for row in rows:
        row["n_total"] = len(images)
    return rows


SCREEN_IMAGES = 500


def _probe_rows(runner: ModelRunner, given: np.ndarray, y: np.ndarray | None,
                only: set[str] | None = None, known: np.ndarray | None = None) -> list[dict[str, Any]]:
    """Rows for the single probes and then the pairs (`only`: just these names, pairs included;
    `known`: the as-given logits of `given`, if already computed)."""
    floats = given.astype(np.float32)
    rows: list[dict[str, Any]] = []
    preds: dict[str, np.ndarray] = {}
    for name in PROBES:
        if only is not None and name not in only:
            continue
        row, pred = _run_steps((name,), given, floats, runner, y, preds.get("as-given"),
                               known if name == "as-given" else None)
        rows.append(row)
        if pred is not None:
            preds[name] = pred
    pairs = _pairs(rows, labels_given=y is not None) if only is None else \
        [tuple(name.split("+")) for name in only if "+" in name]
    for steps in pairs:
        row, pred = _run_steps(steps, given, floats, runner, y, preds.get("as-given"))
        if pred is None:
            continue  # a pair that cannot run says nothing its single steps did not
        key = "accuracy" if y is not None else "pred_entropy"
        single = max((r for r in rows if r["name"] in steps and r["name"] in preds), key=lambda r: r[key],
                     default=None)
        if single is None:
            continue  # neither step ran alone (e.g. a transpose the model needs before any value fix)
        row.update(best_single=single["name"], single_accuracy=single["accuracy"],
                   single_pred_entropy=single["pred_entropy"],
                   agreement_with_best_single=float((pred == preds[single["name"]]).mean()),
                   discordant_with_best_single=_discordant(pred, preds[single["name"]], y))
        rows.append(row)
    return rows


def _promising(rows: list[dict[str, Any]], labels_given: bool) -> set[str]:
    """The probes (and the steps of pairs) worth running on the whole sample."""
    threshold = PAIR_MOVED_ACCURACY if labels_given else PAIR_MOVED_ENTROPY
    key, min_gain = ("accuracy", PAIR_MIN_GAIN_ACCURACY) if labels_given else ("pred_entropy", PAIR_MIN_GAIN_ENTROPY)
    names = {"as-given"}
    for row in rows[1:]:
        if "steps" in row:  # a pair: worth it when it beats its better step on the screen too
            if row[key] >= row[f"single_{key}"] + min_gain / 2:
                names.update([row["name"], *row["steps"]])
        elif _moved(row, rows[0], labels_given) >= threshold:
            names.add(row["name"])
    return names


# A single correction "moved" the predictions when it raised accuracy (with labels) or the
# entropy of the predicted classes (without) by at least this much; only such corrections
# are tried in pairs, and run again on the whole sample after the screen.
PAIR_MOVED_ACCURACY, PAIR_MOVED_ENTROPY = 0.02, 0.05


def _moved(row: dict[str, Any], as_given: dict[str, Any], labels_given: bool) -> float:
    """How much a probe improved the predictions: accuracy, or entropy without labels (0: skipped).

    Only improvements count: a correction that makes things worse is no part of the fix.
    """
    if row.get("skipped"):
        return 0.0
    if as_given.get("skipped"):
        return 1.0 + (row["accuracy"] or 0.0 if labels_given else row["pred_entropy"])
    key = "accuracy" if labels_given else "pred_entropy"
    return row[key] - as_given[key]


def _pairs(rows: list[dict[str, Any]], labels_given: bool) -> list[tuple[str, str]]:
    """(first, second) steps in pipeline order: each stage's best mover with every probe of the others.

    When nothing moved but the predictions are collapsed, every pair of two stages.
    """
    as_given = rows[0]
    threshold = PAIR_MOVED_ACCURACY if labels_given else PAIR_MOVED_ENTROPY
    ran = [r for r in rows[1:] if not r.get("skipped")]
    best_of_stage: dict[int, dict[str, Any]] = {}
    for row in ran:
        stage, moved = PROBES[row["name"]].stage, _moved(row, as_given, labels_given)
        if moved >= threshold and (stage not in best_of_stage
                                   or moved > _moved(best_of_stage[stage], as_given, labels_given)):
            best_of_stage[stage] = row
    pairs: list[tuple[str, str]] = []
    if not best_of_stage and (as_given.get("skipped") or as_given["pred_entropy"] < HEALTHY_ENTROPY):
        # Collapsed, and no single correction helps: two mistakes that each hide the other's
        # fix (a scrambled layout and no /255). Try every pair of two stages.
        names = [n for n in PROBES if n != "as-given"]
        return [(a, b) for a in names for b in names if PROBES[a].stage < PROBES[b].stage]
    for mover in best_of_stage.values():
        for name, probe in PROBES.items():
            if name == "as-given" or probe.stage == PROBES[mover["name"]].stage:
                continue
            steps = tuple(sorted((mover["name"], name), key=lambda n: PROBES[n].stage))
            if steps not in pairs:
                pairs.append(steps)
    return pairs


def _run_steps(steps: tuple[str, ...], given: np.ndarray, floats: np.ndarray, runner: ModelRunner,
               labels: np.ndarray | None, baseline: np.ndarray | None,
               known: np.ndarray | None = None) -> tuple[dict[str, Any], np.ndarray | None]:
    """Run the model on the images after `steps` (one probe, or two in pipeline order);
    `known`: the logits of this run, when the caller already has them."""
    row: dict[str, Any] = {"name": "+".join(steps), "accuracy": None, "pred_entropy": None,
                           "classes_predicted": None, "mean_confidence": None, "agreement_with_as_given": None,
                           "discordant_with_as_given": None,
                           "fix": None, "n_images": len(given)}
    if len(steps) > 1:
        row["steps"] = list(steps)
    if steps == ("as-given",):
        batch = given  # exactly what the user fed; the runner only casts the dtype
    else:
        batch, reason = floats, None
        for name in steps:
            reason = _precondition(name, batch, runner)
            if reason is not None:
                break
            batch = PROBES[name](batch)
            batch = _to_model_range(batch, runner) if PROBES[name].unit_output else batch
        reason = reason or _fits_model(batch, runner)
        if reason is not None:
            return {**row, "skipped": reason}, None
        batch = _cast(batch, runner)
        row["fix"] = "; ".join(probe_fix(name, runner, floats).split("  #")[0] if len(steps) > 1
                               else probe_fix(name, runner, floats) for name in steps)
    try:
        logits = runner.logits(batch) if known is None else known
    except InputError as exc:
        return {**row, "skipped": str(exc)}, None
    preds = logits.argmax(1)
    row.update(prediction_summary(logits, runner.num_classes or logits.shape[1]))
    if labels is not None:
        row["accuracy"] = float((preds == labels).mean())
    if baseline is not None:
        row["agreement_with_as_given"] = float((preds == baseline).mean())
        row["discordant_with_as_given"] = _discordant(preds, baseline, labels)
    return row, preds


def _discordant(preds: np.ndarray, baseline: np.ndarray, labels: np.ndarray | None) -> float | None:
    """The share of images right in one run and wrong in the other: McNemar's discordant pairs."""
    if labels is None:
        return None
    return float(((preds == labels) != (baseline == labels)).mean())


def prediction_summary(logits: np.ndarray, num_classes: int) -> dict[str, Any]:
    """pred_entropy (normalised entropy of the predicted-class histogram), classes, confidence."""
    preds = logits.argmax(1)
    stats = prediction_stats(preds, num_classes)
    shifted = logits - logits.max(1, keepdims=True)
    probs = np.exp(shifted) / np.exp(shifted).sum(1, keepdims=True)
    return {"pred_entropy": stats["pred_entropy"], "classes_predicted": stats["classes_predicted"],
            "mean_confidence": float(probs.max(1).mean())}


# ---- fixes and titles ----------------------------------------------------------------------

def _fmt(values: tuple[float, ...] | list[float], digits: int = 3) -> str:
    return "(" + ", ".join(f"{v:.{digits}g}" for v in values) + ")"


def probe_fix(name: str, runner: ModelRunner, floats: np.ndarray | None = None) -> str:
    """The one-line fix in code that a successful probe stands for."""
    pre = runner.input_spec.get("preprocessing") or {}
    if pre.get("applied_by") == "model" and PROBES[name].finding in ("input-scale", "input-normalization"):
        does = "divides by 255" if pre.get("kind") == "scale" else "standardises them"
        return f"pass the raw uint8 images (0..255, no scaling or normalisation); the model {does} itself"
    pixels = floats is not None and float(floats.max()) > 1.5
    target = model_range(runner) or "0..1"
    unit_to_target = {"0..255": " * 255.0", "standardized": " * 255.0  # then the model's mean/std"}.get(target, "")
    return PROBES[name].fix(FixContext(pre, target, unit_to_target, pixels, runner.input_spec.get("layout")))


def _standardize_fix(context: FixContext, mean: tuple[float, ...], std: tuple[float, ...]) -> str:
    pre, pixels = context.pre, context.pixels
    scale = "x / 255.0" if pixels else "x"
    if pre.get("applied_by") == "caller" and pre.get("kind") == "standardize":
        # The model's own constants (pixel units) beat the generic ones the probe used.
        source = "x" if pixels else "x * 255.0"
        return f"x = ({source} - {_fmt(pre['mean'], 4)}) / {_fmt(pre['std'], 4)}  # the model's training mean/std"
    return f"x = ({scale} - {_fmt(mean)}) / {_fmt(std)}  # the model was trained on standardised inputs"


# ---- probe findings ------------------------------------------------------------------------

def probe_findings(probes: list[dict[str, Any]], labels_given: bool) -> list[Finding]:
    """One finding per cause whose probe clearly beats the images as given; best first.

    With labels: accuracy rises by >= 0.2 absolute and at least doubles (severity error);
    or predictions go from collapsed to healthy (below) without losing accuracy (error); or,
    for subtler mistakes such as BGR, accuracy rises by >= 0.05 and a paired test on the same
    images rules out chance (warning). Without labels: the entropy of predicted classes goes
    from collapsed (< 0.6) to healthy (> 0.8) (error), or rises by >= 0.15 to healthy
    (warning: a keras-cnn fed raw pixels predicts all 10 classes, skewed, entropy 0.75).

    Confidence is reported but not required to rise: inputs 255x too large saturate the
    network and make it *more* confident (measured: 0.91 on raw pixels vs 0.51 on correct
    0..1 inputs for a keras-cnn), so it would hide the most common mistake.
    """
    as_given = next((p for p in probes if p["name"] == "as-given"), None)
    if as_given is None:
        return []
    by_name = {p["name"]: p for p in probes}
    best: dict[str, Finding] = {}
    for probe in probes:
        if probe["name"] == "as-given" or probe.get("skipped"):
            continue
        pair = "steps" in probe
        if pair and not _beats_single(probe, by_name[probe["best_single"]], labels_given):
            continue  # one of its steps alone does as well: only that one is a mistake
        finding = _judge(probe, as_given, labels_given)
        cause = "two-mistakes" if pair else PROBES[probe["name"]].finding
        if finding is not None and (cause not in best or finding.score > best[cause].score):
            best[cause] = finding
    return _drop_partial_corrections(sorted(best.values(), key=lambda f: -f.score), labels_given)


# A pair of corrections is two mistakes only when it beats the better of its steps alone by
# this much (accuracy with labels, entropy without), beyond noise.
PAIR_MIN_GAIN_ACCURACY, PAIR_MIN_GAIN_ENTROPY = 0.05, 0.10


def _beats_single(pair: dict[str, Any], single: dict[str, Any], labels_given: bool) -> bool:
    if not labels_given:
        return pair["pred_entropy"] >= single["pred_entropy"] + PAIR_MIN_GAIN_ENTROPY
    gain = pair["accuracy"] - single["accuracy"]
    return gain >= PAIR_MIN_GAIN_ACCURACY and _mcnemar_z(gain, pair["discordant_with_best_single"],
                                                         pair["n_images"]) > SIGNIFICANT_Z


def _drop_partial_corrections(findings: list[Finding], labels_given: bool) -> list[Finding]:
    """Keep only corrections about as good as the best one.

    A transform that leaves the model clearly worse than another one (e.g. rescaling BGR
    images helps a little by accident) only partly undoes the real cause.
    """
    key = "accuracy_corrected" if labels_given else "pred_entropy_corrected"
    if not findings:
        return findings
    top = max(f.evidence[key] for f in findings)
    return [f for f in findings if f.evidence[key] >= top - 0.05]


def _judge(probe: dict[str, Any], as_given: dict[str, Any], labels_given: bool) -> Finding | None:
    ran = not as_given.get("skipped")
    entropy_before = as_given["pred_entropy"] if ran else 0.0
    entropy_gain = probe["pred_entropy"] - entropy_before
    recovers = entropy_before < COLLAPSED_ENTROPY and probe["pred_entropy"] > HEALTHY_ENTROPY
    spread = (f"spreads predictions from {as_given['classes_predicted']} to {probe['classes_predicted']} "
              f"classes (entropy {entropy_before:.2f} -> {probe['pred_entropy']:.2f})")
    if not labels_given:
        if recovers:
            severity = "error"
        elif probe["pred_entropy"] > HEALTHY_ENTROPY and entropy_gain >= 0.15 and ran:
            severity = "warning"  # skewed (not collapsed) predictions become healthy
        else:
            return None
        change = spread if ran else f"makes them usable: {probe['classes_predicted']} classes predicted"
        return _finding(probe, as_given, severity, change, entropy_gain, labels_given)
    before, after = (as_given["accuracy"] or 0.0) if ran else 0.0, probe["accuracy"]
    gain = after - before
    if gain >= 0.2 and after >= 2 * before:
        severity = "error"
    elif recovers and gain >= 0:
        severity = "error"
    elif gain >= 0.05 and ran and _significant(probe, as_given):
        severity = "warning"
    else:
        return None
    change = (f"raises accuracy from {before:.1%} to {after:.1%}" if ran
              else f"makes them usable: accuracy {after:.1%}")
    if recovers and gain < 0.2:
        change += f" and {spread}"
    return _finding(probe, as_given, severity, change, gain + 0.25 * max(entropy_gain, 0.0), labels_given)


# A paired accuracy gain is real when McNemar's z exceeds this (one-sided p < 3e-5 per probe,
# so even the ~50 probes and pairs of one diagnosis stay far from a chance finding).
SIGNIFICANT_Z = 4.0


def _significant(probe: dict[str, Any], as_given: dict[str, Any]) -> bool:
    """Is the accuracy gain more than sampling noise? McNemar's test on the paired runs."""
    gain = probe["accuracy"] - as_given["accuracy"]
    return _mcnemar_z(gain, probe["discordant_with_as_given"], probe.get("n_images", 2000)) > SIGNIFICANT_Z


def _mcnemar_z(gain: float, discordant: float, n: int) -> float:
    """McNemar's z for an accuracy gain measured on the same n images twice.

    Only images right in one run and wrong in the other (a share d of the n) can move the
    accuracy; under "no real effect" each is as likely to be a gain as a loss, so the gain's
    standard error is sqrt(d / n). (Images that go from one wrong class to another do not
    count: an earlier bound used every changed prediction and was up to 3x too strict, missing
    a /255 that lifted a weak CIFAR-100 model from 1.4% to 12.8% on 1,000 images.)
    """
    return gain / np.sqrt(max(discordant, 1e-9) / n)


def _sample_note(probe: dict[str, Any]) -> str:
    """" (on a sample of 2,000 of the 10,000 images)" when the probes ran on a sample."""
    n, total = probe.get("n_images"), probe.get("n_total")
    return f" (on a sample of {n:,} of the {total:,} images)" if n and total and n < total else ""


def _finding(probe: dict[str, Any], as_given: dict[str, Any], severity: str, change: str,
             score: float, labels_given: bool) -> Finding:
    name = probe["name"]
    steps = [PROBES[step] for step in probe.get("steps", [name])]
    action = " and ".join(step.action for step in steps)
    effect = f"{action} {change}{_sample_note(probe)}"
    if len(steps) == 1:
        title, finding_id = f"{steps[0].cause}: {effect}", steps[0].finding
    else:
        single = probe["best_single"]
        title = (f"Two mistakes in the evaluation inputs, {steps[0].mistake} and {steps[1].mistake}: {effect}; "
                 f"{PROBES[single].action} alone reaches "
                 + (f"{probe['single_accuracy']:.1%}" if labels_given else
                    f"entropy {probe['single_pred_entropy']:.2f}"))
        finding_id = "two-mistakes"
    evidence = {
        "transform": name,
        "effect": effect,
        "accuracy_as_given": as_given.get("accuracy"),
        "accuracy_corrected": probe["accuracy"],
        "pred_entropy_as_given": as_given.get("pred_entropy"),
        "pred_entropy_corrected": probe["pred_entropy"],
        "classes_predicted_as_given": as_given.get("classes_predicted"),
        "classes_predicted_corrected": probe["classes_predicted"],
        "mean_confidence_as_given": as_given.get("mean_confidence"),
        "mean_confidence_corrected": probe["mean_confidence"],
        "agreement_with_as_given": probe.get("agreement_with_as_given"),
        "n_images": probe.get("n_images"),
    }
    if len(steps) > 1:
        evidence.update({"steps": probe["steps"], "best_single": probe["best_single"],
                         "accuracy_best_single": probe.get("single_accuracy")})
    if as_given.get("skipped"):
        evidence["as_given_error"] = as_given["skipped"]
    measured = "accuracy on the labels given" if labels_given else "the spread and confidence of predictions"
    detail = (f"The model was re-run on the same images after '{name}'. Judged by {measured}, the "
              f"corrected images work far better than the images as given, so "
              + ("this correction undoes the mistake made when the evaluation inputs were prepared."
                 if len(steps) == 1 else
                 "these two corrections together undo the mistakes made when the evaluation inputs were "
                 "prepared; either one alone does clearly worse."))
    return Finding(finding_id, severity, title, detail, evidence, probe.get("fix") or "", score)
