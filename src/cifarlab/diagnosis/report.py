"""The diagnosis document: findings with evidence and a fix, probes, and a verdict.

JSON schema (stable; documented in the README):
    {"verdict": "healthy" | "problem",
     "summary": {...},                      # headline numbers: accuracy, entropy, collapse, ...
     "findings": [{"id", "severity", "title", "detail", "evidence": {...}, "fix"}],
     "probes": [{"name", "accuracy", "pred_entropy", ...}]}
Findings are ordered most likely cause first: causes (a preprocessing mismatch, misaligned
labels, training mode) before the symptoms they explain (collapse, chance accuracy, a gap
to the trained accuracy), then by severity and strength. The verdict is "problem" when any
finding has severity "error" or "warning"; "info" findings never fail a pipeline.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

SEVERITIES = ("error", "warning", "info")

# Stable ids; tools may match on them.
FINDING_IDS = (
    "prediction-collapse", "input-scale", "input-normalization", "channel-order", "input-layout",
    "label-permutation", "fine-coarse-labels", "train-mode-inference", "two-mistakes", "near-chance",
    "train-eval-gap", "input-shape",
)


SUMMARY_KEYS = ("model", "model_expects", "num_samples", "num_classes", "accuracy", "chance_accuracy", "classes_predicted",
                "top_classes", "top_classes_share", "pred_entropy", "true_entropy", "mean_confidence",
                "as_given_error")

# Findings that name why the model misbehaves, as opposed to how it shows.
CAUSE_IDS = frozenset({"input-scale", "input-normalization", "channel-order", "input-layout", "input-shape",
                       "label-permutation", "fine-coarse-labels", "train-mode-inference", "two-mistakes"})


@dataclass
class Finding:
    id: str
    severity: str  # "error" | "warning" | "info"
    title: str  # one line, e.g. "Evaluation inputs are 255x larger than training inputs"
    detail: str  # a few sentences: what was measured and why it points to this cause
    evidence: dict[str, Any] = field(default_factory=dict)
    fix: str = ""  # the one-line fix, e.g. "x = x / 255.0 before model.predict(x)"
    score: float = 0.0  # ranking weight (higher = more likely the cause); not serialised

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise ValueError(f"severity must be one of {SEVERITIES}, got {self.severity!r}")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("score")
        return data


@dataclass(frozen=True)
class ClassCounts:
    """The diagnosed outputs counted per class: `confusion` (true x predicted) where the labels
    were known, else only `predicted` counts; `names` one per class."""

    names: list[str]
    predicted: np.ndarray
    confusion: np.ndarray | None = None

    @property
    def true(self) -> np.ndarray | None:
        return None if self.confusion is None else self.confusion.sum(1)


@dataclass
class Diagnosis:
    summary: dict[str, Any] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)
    probes: list[dict[str, Any]] = field(default_factory=list)
    # What the findings were computed from, for drawing (cifarlab.diagnosis.figures); not in
    # the JSON document. The matrix where labels were known, else the predicted counts alone.
    counts: ClassCounts | None = None

    @property
    def verdict(self) -> str:
        return "problem" if any(f.severity in ("error", "warning") for f in self.findings) else "healthy"

    @property
    def exit_code(self) -> int:
        """0 healthy, 1 problem (2 is reserved for bad usage, raised as CifarlabError)."""
        return 0 if self.verdict == "healthy" else 1

    def add(self, finding: Finding) -> None:
        self.findings.append(finding)

    def ranked(self) -> list[Finding]:
        order = {s: i for i, s in enumerate(SEVERITIES)}
        return sorted(self.findings, key=lambda f: (f.severity == "info", f.id not in CAUSE_IDS,
                                                    order[f.severity], -f.score))

    def to_dict(self) -> dict[str, Any]:
        return {"verdict": self.verdict, "summary": self.summary,
                "findings": [f.to_dict() for f in self.ranked()], "probes": self.probes}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=_jsonable)

    def format_text(self) -> str:
        """The terminal summary: verdict, most likely cause first, evidence, the fix."""
        lines = [f"verdict: {self.verdict.upper()}"]
        for key in SUMMARY_KEYS:  # the headline numbers; --json has all of them
            value = self.summary.get(key)
            if isinstance(value, list):
                value = ", ".join(map(str, value[:10])) + (", ..." if len(value) > 10 else "")
            if value is not None:
                lines.append(f"  {key}: {value:.4g}" if isinstance(value, float) else f"  {key}: {value}")
        for i, finding in enumerate(self.ranked(), 1):
            lines += ["", f"{i}. [{finding.severity}] {finding.title}  ({finding.id})", f"   {finding.detail}"]
            if finding.fix:
                lines.append(f"   fix: {finding.fix}")
        if self.probes:
            lines += ["", "probes (the model re-run under candidate corrections):"]
            for probe in self.probes:
                lines.append(f"  {probe['name']:24s} {_probe_text(probe)}")
        return "\n".join(lines)


def _probe_text(probe: dict[str, Any]) -> str:
    if probe.get("skipped"):
        return f"skipped: {probe['skipped']}"
    acc = probe.get("accuracy")
    acc_text = f"accuracy {acc:6.1%}" if acc is not None else "accuracy    n/a"
    return (f"{acc_text}  pred entropy {probe['pred_entropy']:.2f}  "
            f"classes {probe['classes_predicted']:3d}  confidence {probe['mean_confidence']:.2f}")


def _jsonable(value: Any) -> Any:
    """numpy scalars and arrays inside evidence become plain JSON."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
