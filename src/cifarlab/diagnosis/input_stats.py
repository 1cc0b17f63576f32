"""Compare the images a model is fed with the statistics of its training inputs (when the model
file records them): scale, normalisation, channel order and layout, measured directly."""

from __future__ import annotations

from typing import Any

import numpy as np

from cifarlab.diagnosis.probes import (
    CIFAR_MEAN,
    CIFAR_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    channel_axis,
    model_range,
    probe_fix,
    sample_indices,
)
from cifarlab.diagnosis.report import Finding
from cifarlab.runner import ModelRunner


def expected_input_stats(runner: ModelRunner) -> dict[str, Any] | None:
    """Per-channel mean/std/min/max of what the model was trained on, in its input units."""
    stats = runner.train_stats
    if not stats:
        return None
    pre = runner.input_spec.get("preprocessing") or {}
    if pre.get("applied_by") != "caller":  # the model takes raw pixels
        return {key: np.asarray(stats[key], np.float64) for key in ("mean", "std", "min", "max")}
    mean, std = np.asarray(pre["mean"], np.float64), np.asarray(pre["std"], np.float64)
    return {"mean": (np.asarray(stats["mean"]) - mean) / std, "std": np.asarray(stats["std"]) / std,
            "min": (np.asarray(stats["min"]) - mean) / std, "max": (np.asarray(stats["max"]) - mean) / std}


def image_stats(images: np.ndarray, axis: int, max_images: int = 2000) -> dict[str, np.ndarray]:
    sample = np.asarray(images[sample_indices(len(images), max_images)], np.float64)
    per_channel = np.moveaxis(sample, axis, -1).reshape(-1, sample.shape[axis])
    return {"mean": per_channel.mean(0), "std": per_channel.std(0),
            "min": per_channel.min(0), "max": per_channel.max(0)}


def input_findings(images: np.ndarray, runner: ModelRunner) -> list[Finding]:
    """Compare the images with the model's stored training statistics (needs runner.train_stats).

    Emits the same ids as the probes (input-layout, input-scale, input-normalization,
    channel-order), with the statistics as evidence; the probes confirm them by re-running.
    """
    expected = expected_input_stats(runner)
    images = np.asarray(images)
    axis = channel_axis(images)
    if expected is None or axis is None:
        return []
    given = image_stats(images, axis)
    findings = [f for f in (_layout_finding(images, axis, runner), _range_finding(images, given, expected, runner))
                if f is not None]
    if not any(f.id in ("input-scale", "input-normalization") for f in findings):
        channel = _channel_order_finding(given, expected, runner)
        findings += [channel] if channel is not None else []
    return findings


def _stats_evidence(images: np.ndarray, given: dict[str, np.ndarray], expected: dict[str, Any]) -> dict[str, Any]:
    rounded = lambda v: [round(float(x), 4) for x in v]  # noqa: E731
    return {"dtype": str(images.dtype), "shape": list(images.shape),
            "given_mean": rounded(given["mean"]), "given_std": rounded(given["std"]),
            "given_min": float(given["min"].min()), "given_max": float(given["max"].max()),
            "train_mean": rounded(expected["mean"]), "train_std": rounded(expected["std"]),
            "train_min": float(np.min(expected["min"])), "train_max": float(np.max(expected["max"]))}


def _layout_finding(images: np.ndarray, axis: int, runner: ModelRunner) -> Finding | None:
    layout = runner.input_spec.get("layout")
    given = "NHWC" if axis == -1 else "NCHW"
    if layout is None or layout == given:
        return None
    fix = probe_fix("nchw-to-nhwc" if given == "NCHW" else "nhwc-to-nchw", runner)
    return Finding("input-layout", "error", f"Evaluation inputs are {given} {tuple(images.shape)}, "
                   f"but the model takes {layout}",
                   f"The channels are on axis {1 if axis == 1 else 3} of the images; the model was "
                   f"trained on {layout} arrays, so it cannot run them (or mixes up rows and colours).",
                   {"given_layout": given, "model_layout": layout, "shape": list(images.shape)}, fix, 0.9)


def _range_finding(images: np.ndarray, given: dict[str, np.ndarray], expected: dict[str, Any],
                   runner: ModelRunner) -> Finding | None:
    """input-scale / input-normalization from the value ranges, or None when they match."""
    g_mean, e_mean = float(given["mean"].mean()), float(expected["mean"].mean())
    g_std, e_std = float(given["std"].mean()), float(expected["std"].mean())
    g_min, e_min = float(given["min"].min()), float(np.min(expected["min"]))
    ratio = g_std / e_std if e_std > 0 else float("inf")
    if 0.5 <= ratio <= 2 and abs(g_mean - e_mean) <= 0.5 * e_std:
        return None
    evidence = {**_stats_evidence(images, given, expected), "std_ratio": round(ratio, 4)}
    units = "raw pixels 0..255" if model_range(runner) == "0..255" else model_range(runner)
    said = (f"mean pixel is {g_mean:.4g} (std {g_std:.3g}); training mean was {e_mean:.4g} "
            f"(std {e_std:.3g}) in the model's input units ({units})")
    # Constant images (std 0) have no scale to compare: they fall through to the general mismatch.
    if g_min >= 0 and e_min >= 0 and g_std > 0 and (ratio > 30 or ratio < 1 / 30):
        larger = ratio > 1
        factor = ratio if larger else 1 / ratio
        probe = "divide-by-255" if larger else "multiply-by-255"
        # A std ratio of 240-270 is the /255 mistake; say the factor the fix uses.
        shown = "255" if 200 <= factor <= 330 else f"about {factor:.0f}"
        why = (" They look scaled to 0..1: /255 applied twice, or by a caller when the model does it itself."
               if not larger and g_std <= 1 else "")
        return Finding("input-scale", "error",
                       f"Evaluation inputs are {shown}x {'larger' if larger else 'smaller'} than the model's "
                       "training inputs", f"The {said}.{why}", evidence, probe_fix(probe, runner, images), 0.8)
    if g_min < 0 <= e_min:
        title = "Evaluation inputs are mean/std-normalised (negative values), but the model was trained on " + \
                ("raw pixels 0..255" if units == "raw pixels 0..255" else f"pixels in {units}")
        probe = "unstandardize-imagenet" if _closer_to_imagenet(given) else "unstandardize-cifar"
        return Finding("input-normalization", "error", title, f"The {said}.", evidence,
                       probe_fix(probe, runner, images), 0.8)
    if g_min >= 0 > e_min:
        return Finding("input-normalization", "error",
                       "The model was trained on standardised inputs (mean 0, std 1), but the evaluation "
                       "inputs are not normalised", f"The {said}.", evidence,
                       probe_fix("standardize-cifar", runner, images), 0.8)
    return Finding("input-normalization", "warning",
                   f"Evaluation inputs differ from the training inputs: std {ratio:.2g}x the training std",
                   f"The {said}.", evidence, "", 0.3)


def _closer_to_imagenet(given: dict[str, np.ndarray]) -> bool:
    """Which normalisation turns the given means back into typical natural-image means."""
    def error(mean: tuple[float, ...], std: tuple[float, ...]) -> float:
        restored = given["mean"] * np.asarray(std) + np.asarray(mean)
        return float(np.abs(restored - np.asarray(CIFAR_MEAN)).sum())
    return error(IMAGENET_MEAN, IMAGENET_STD) < error(CIFAR_MEAN, CIFAR_STD)


def _channel_order_finding(given: dict[str, np.ndarray], expected: dict[str, Any],
                           runner: ModelRunner) -> Finding | None:
    """Reversed channels: the per-channel mean profile matches training much better reversed."""
    def profile(stats: dict[str, Any]) -> np.ndarray:
        mean = np.asarray(stats["mean"], np.float64)
        return (mean - mean.mean()) / max(float(np.mean(stats["std"])), 1e-12)

    g, e = profile(given), profile(expected)
    same, reversed_ = float(np.abs(g - e).sum()), float(np.abs(g - e[::-1]).sum())
    distinct = float(np.abs(e - e[::-1]).sum())  # how much reversal changes the training profile
    if distinct < 0.05 or reversed_ > 0.3 * same:
        return None
    evidence = {"given_mean": [round(float(v), 4) for v in given["mean"]],
                "train_mean": [round(float(v), 4) for v in expected["mean"]],
                "profile_distance_as_given": round(same, 4), "profile_distance_reversed": round(reversed_, 4)}
    return Finding("channel-order", "warning",
                   "Evaluation inputs look BGR: their per-channel means match the training means reversed",
                   f"Per-channel means {evidence['given_mean']} vs training {evidence['train_mean']}: the "
                   f"difference is {same:.3f} std as given but {reversed_:.3f} with the channels reversed.",
                   evidence, probe_fix("swap-rgb-bgr", runner), 0.5)


