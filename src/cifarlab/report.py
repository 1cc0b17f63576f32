"""A self-contained HTML report of evaluations, a diagnosis and a training history.

One .html file: every figure is a PNG embedded as a base64 ``data:`` URI, the CSS is inline
and there is no JavaScript, so the page can be attached to a CI run or mailed and opened
offline. A Content-Security-Policy forbids the page any network request.

Given two evaluations (say, the same model evaluated correctly and on wrongly scaled
pixels) every section shows them side by side, one column each, so that the contrast
(a diagonal against two vertical bars) is visible at a glance.

Inputs are read as written by ``cifarlab evaluate`` (the folder: metrics.json, cm.json,
confused_examples.npz), ``cifarlab diagnose --json`` and training (history.csv).
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from cifarlab import __version__
from cifarlab.choices import CM_SCALES
from cifarlab.errors import CifarlabError
from cifarlab.history import read_history
from cifarlab.metrics import most_confused_pairs
from cifarlab.plots import (
    confusion_matrix_figure,
    history_figure,
    per_class_accuracy_figure,
    png_bytes,
    prediction_histogram_figure,
)
from cifarlab.results import EVALUATE_HINT, ConfusedExamples, ConfusedPair, EvaluationResult
from cifarlab.schema import Fields, read_json_file

__all__ = ["write_report", "load_evaluation", "CM_SCALES"]

# Example images are 32x32; 3x nearest-neighbour keeps the pixels crisp and the table compact.
THUMB_SCALE = 3
PAIRS_SHOWN = 10


@dataclass
class Evaluation:
    """One evaluation as the report shows it: the result, its title, its example images."""

    label: str
    result: EvaluationResult
    examples: ConfusedExamples | None

    @property
    def cm(self) -> np.ndarray:
        return self.result.confusion_matrix

    @property
    def classes(self) -> list[str]:
        return self.result.classes

    @property
    def folder(self) -> Path | None:
        return self.result.out_dir

    @property
    def where(self) -> str:
        return self.result.where


# ---- the public entry point -----------------------------------------------------------------

def write_report(out: str | Path, *, evaluations: list[str | Path | dict[str, Any] | EvaluationResult],
                 diagnosis: str | Path | dict[str, Any] | Any | None = None,
                 history: str | Path | None = None, title: str | None = None,
                 cm_scale: str = "linear", mask_diagonal: bool = False,
                 diagnosis_plots: str | Path | None = None) -> Path:
    """Write a self-contained HTML report to `out` and return its path.

    `evaluations`: evaluation folders (or their metrics.json) written by `cifarlab evaluate`,
    or the results `evaluate` returns; several are shown side by side, each titled by its
    "label" key if it has one, else by its folder's name. `diagnosis`: the document of
    `cifarlab diagnose --json` (a path or dict) or a Diagnosis. `history`: a run's
    history.csv. `cm_scale` "log" colours the confusion matrices on a log scale;
    `mask_diagonal` greys out the correct predictions. `diagnosis_plots`: the folder that
    `diagnose(plot_dir=...)` wrote (its confusion matrix and class histogram are embedded).
    """
    if cm_scale not in CM_SCALES:
        raise CifarlabError(f"cm_scale must be one of {', '.join(CM_SCALES)}, got {cm_scale!r}")
    evals = [load_evaluation(item) for item in evaluations]
    diag = load_diagnosis(diagnosis) if diagnosis is not None else None
    if not evals and diag is None:
        raise CifarlabError("nothing to report: give at least one evaluation folder (" + EVALUATE_HINT
                            + ") or a diagnosis (`cifarlab diagnose ... --json > diag.json`)")
    history_rows = read_history(history) if history is not None else None
    title = title or "cifarlab report — " + (" vs ".join(e.label for e in evals) or "diagnosis")
    canvas = Canvas()
    sections = [
        headline_section(evals),
        diagnosis_section(diag, canvas, diagnosis_plots) if diag is not None else "",
        *evaluation_sections(evals, canvas, cm_scale, mask_diagonal),
        history_section(Path(history), history_rows, canvas) if history is not None and history_rows else "",
    ]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page(title, evals, "\n".join(s for s in sections if s)), encoding="utf-8")
    return out


# ---- reading the inputs -----------------------------------------------------------------

def load_evaluation(item: str | Path | dict[str, Any] | EvaluationResult) -> Evaluation:
    """An evaluation folder (or its metrics.json), or the result `evaluate` returned (or its dict)."""
    if isinstance(item, EvaluationResult):
        result = item
    elif isinstance(item, dict):
        of = f" of {item['out_dir']}" if item.get("out_dir") else ""
        result = EvaluationResult.from_dict(item, f"the metrics dict{of}")
    else:
        result = EvaluationResult.from_folder(item)
    folder = result.out_dir
    examples = ConfusedExamples.load(folder / "confused_examples.npz", result.num_classes) if folder else None
    return Evaluation(result.label or (folder.name if folder else "evaluation"), result, examples)


def load_diagnosis(diagnosis: str | Path | dict[str, Any] | Any) -> dict[str, Any]:
    """The `cifarlab diagnose --json` document from a path, a dict or a Diagnosis object."""
    if hasattr(diagnosis, "to_json"):  # a Diagnosis; through JSON so numpy evidence becomes plain
        doc = json.loads(diagnosis.to_json())
    elif isinstance(diagnosis, dict):
        doc = diagnosis
    else:
        path = Path(diagnosis)
        doc = read_json_file(path, "the JSON document of `cifarlab diagnose ... --json`", CifarlabError)
    check_diagnosis_document(doc)
    return doc


def check_diagnosis_document(doc: Any) -> None:
    """The fields the report shows, each of the type it shows: text as strings, evidence and
    summary as objects, probes as objects with a name."""
    f = Fields(doc, "the diagnosis", "it must be the document of `cifarlab diagnose ... --json > diag.json`")
    f.require("verdict", "findings")
    f.string("verdict")
    for finding in f.objects("findings"):
        for key in ("id", "severity", "title", "detail", "fix"):
            finding.optional_string(key)
        finding.optional_dict("evidence")
    f.optional_dict("summary")
    if f.has("probes"):
        for probe in f.objects("probes"):
            probe.optional_string("name")


# ---- figures ------------------------------------------------------------------------------

class Canvas:
    """Draws figures in memory and hands them back as data: URIs."""

    def draw(self, figure: Callable[..., Figure], *args: Any, **kwargs: Any) -> str:
        return png_uri(png_bytes(figure(*args, **kwargs)))


def png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def thumbnail_uri(image: np.ndarray, scale: int = THUMB_SCALE) -> str:
    """A small image as an upscaled PNG; nearest neighbour so 32x32 pixels stay pixels."""
    picture = Image.fromarray(np.asarray(image, dtype=np.uint8))
    picture = picture.resize((picture.width * scale, picture.height * scale), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return png_uri(buffer.getvalue())


# ---- HTML helpers -------------------------------------------------------------------------

def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def img(uri: str, alt: str, cls: str = "fig") -> str:
    return f'<img class="{cls}" src="{uri}" alt="{esc(alt)}">'


def row(panels: list[str]) -> str:
    """Panels side by side, one column each (one evaluation per column)."""
    columns = max(1, len(panels))
    inner = "".join(f'<div class="panel">{p}</div>' for p in panels)
    return f'<div class="row" style="grid-template-columns: repeat({columns}, minmax(0, 1fr))">{inner}</div>'


def section(heading: str, body: str, note: str = "") -> str:
    note_html = f'<p class="note">{esc(note)}</p>' if note else ""
    return f"<section><h2>{esc(heading)}</h2>{note_html}{body}</section>"


def table(header: list[str], rows: list[list[str]], cls: str = "") -> str:
    """Cells are already HTML (escape text before)."""
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def pct(value: Any) -> str:
    return f"{value:.1%}" if isinstance(value, (int, float)) else "—"


# ---- sections ---------------------------------------------------------------------------

def headline_section(evals: list[Evaluation]) -> str:
    if not evals:
        return ""
    cards = row([headline_card(e) for e in evals])
    rows = [[esc(name)] + [cell(e) for e in evals] for name, cell in HEADLINE_ROWS]
    return section("Headline", cards + table(["", *(esc(e.label) for e in evals)], rows, "metrics"))


def headline_card(e: Evaluation) -> str:
    n, num_classes = int(e.cm.sum()), len(e.classes)
    chance = 1 / num_classes
    predicted = int((e.cm.sum(0) > 0).sum())
    # Twice chance is no verdict (the diagnosis gives that), just a cue that this column is the odd one.
    tone = "low" if e.result.accuracy < 2 * chance else "ok"
    return (f'<div class="card {tone}"><div class="label">{esc(e.label)}</div>'
            f'<div class="big">{pct(e.result.accuracy)}</div>'
            f'<div>accuracy on {n:,} images · chance {pct(chance)}</div>'
            f'<div>{predicted} of {num_classes} classes ever predicted</div>'
            f'<div class="small">{esc(e.where)}</div></div>')


def _top_k(e: Evaluation) -> str:
    r = e.result
    return f"{pct(r.top_k_accuracy)} (top{r.top_k})" if r.top_k is not None else "—"


def _largest_share(e: Evaluation) -> str:
    counts = e.cm.sum(0)
    return f"{pct(counts.max() / max(counts.sum(), 1))} ({esc(e.classes[int(counts.argmax())])})"


HEADLINE_ROWS: list[tuple[str, Callable[[Evaluation], str]]] = [
    ("accuracy", lambda e: f"<b>{pct(e.result.accuracy)}</b>"),
    ("top-k accuracy", _top_k),
    ("coarse (superclass) accuracy", lambda e: pct(e.result.coarse.accuracy if e.result.coarse else None)),
    ("macro F1", lambda e: f"{e.result.macro_f1:.3f}"),
    ("mean confidence", lambda e: pct(e.result.mean_confidence)),
    ("largest predicted class", _largest_share),
    ("split", lambda e: esc(e.result.split or "—")),
    ("model", lambda e: esc((e.result.model and e.result.model.architecture) or "—")),
    ("model file", lambda e: esc((e.result.model and e.result.model.path) or "—")),
    ("dataset", lambda e: esc(e.result.dataset_name or "—")),
    ("images", lambda e: f"{int(e.cm.sum()):,}"),
    ("classes", lambda e: str(len(e.classes))),
    ("test-time augmentation", lambda e: esc(e.result.tta or "none")),
    ("evaluation folder", lambda e: esc(e.folder or "—")),
]


def evaluation_sections(evals: list[Evaluation], canvas: Canvas, cm_scale: str, mask_diagonal: bool) -> list[str]:
    if not evals:
        return []
    style = ", ".join(s for s in ("log colour scale" if cm_scale == "log" else "",
                                  "diagonal masked" if mask_diagonal else "") if s)
    note = "Rows are true classes, columns predicted classes; each row is divided by its total."
    sections = [section("Confusion matrix",
                        row([confusion_panel(e, canvas, cm_scale, mask_diagonal, style) for e in evals]), note)]
    if any(e.result.coarse for e in evals):
        sections.append(section("Superclass (coarse) confusion matrix",
                                row([coarse_panel(e, canvas, cm_scale, mask_diagonal, style) for e in evals]), note))
    sections += [
        section("Predicted vs true class counts", row([histogram_panel(e, canvas) for e in evals]),
                "A healthy model's red bars follow the blue ones; a collapsed one has a few tall red bars."),
        section("Per-class accuracy, best first", row([per_class_panel(e, canvas) for e in evals])),
        section("Most-confused pairs", row([pairs_panel(e) for e in evals]),
                "The most confident mistakes of each pair, as the model saw them (upscaled, nearest neighbour)."),
    ]
    return sections


def confusion_panel(e: Evaluation, canvas: Canvas, cm_scale: str, mask_diagonal: bool, style: str) -> str:
    title = (f"{e.label}: {e.where}, {int(e.cm.sum()):,} images, accuracy {e.result.accuracy:.1%}"
             + (f" ({style})" if style else ""))
    uri = canvas.draw(confusion_matrix_figure, e.cm, e.classes, title=title,
                      log_scale=cm_scale == "log", mask_diagonal=mask_diagonal)
    return f"<h3>{esc(e.label)}</h3>" + img(uri, f"confusion matrix: {title}")


def coarse_panel(e: Evaluation, canvas: Canvas, cm_scale: str, mask_diagonal: bool, style: str) -> str:
    coarse = e.result.coarse
    if coarse is None:
        return f"<h3>{esc(e.label)}</h3><p class='note'>no superclass labels in this evaluation</p>"
    title = (f"{e.label}: superclasses, {e.where}, coarse accuracy {coarse.accuracy:.1%}"
             + (f" ({style})" if style else ""))
    uri = canvas.draw(confusion_matrix_figure, coarse.confusion_matrix, coarse.classes, title=title,
                      log_scale=cm_scale == "log", mask_diagonal=mask_diagonal)
    pairs = ", ".join(f"{esc(p.true)} → {esc(p.predicted)} ({p.count:,})" for p in coarse.most_confused[:3])
    return (f"<h3>{esc(e.label)}</h3>" + img(uri, f"coarse confusion matrix: {title}")
            + f"<p class='note'>most confused: {pairs or 'none'}</p>")


def histogram_panel(e: Evaluation, canvas: Canvas) -> str:
    title = f"{e.label}: predicted vs true class counts"  # short: the figure is only 8 inches wide
    uri = canvas.draw(prediction_histogram_figure, e.cm.sum(1), e.cm.sum(0), e.classes, title=title)
    return f"<h3>{esc(e.label)}</h3>" + img(uri, title)


def per_class_panel(e: Evaluation, canvas: Canvas) -> str:
    totals = e.cm.sum(1)
    accuracy = np.divide(np.diag(e.cm), totals, out=np.zeros(len(totals)), where=totals > 0)
    title = f"{e.label}: accuracy of each true class"
    uri = canvas.draw(per_class_accuracy_figure, accuracy, e.classes, title=title,
                      overall=e.result.accuracy, chance=1 / len(e.classes))
    worst = np.argsort(accuracy, kind="stable")[:5]
    text = ", ".join(f"{esc(e.classes[i])} {pct(accuracy[i])}" for i in worst)
    return f"<h3>{esc(e.label)}</h3>" + img(uri, title) + f"<p class='note'>lowest: {text}</p>"


def pairs_panel(e: Evaluation) -> str:
    pairs = e.result.most_confused or [ConfusedPair(**d) for d in most_confused_pairs(e.cm, e.classes, k=PAIRS_SHOWN)]
    if not pairs:
        return f"<h3>{esc(e.label)}</h3><p class='note'>no mistakes: every image was classified correctly</p>"
    rows = [[esc(p.true), esc(p.predicted), f"{p.count:,}", pct(p.rate), example_cells(e, p)]
            for p in pairs[:PAIRS_SHOWN]]
    note = "" if e.examples is not None else (
        "<p class='note'>No example images: this folder has no confused_examples.npz "
        "(written by `cifarlab evaluate` since it stores examples; evaluate again to get them).</p>")
    return (f"<h3>{esc(e.label)}</h3>"
            + table(["true", "predicted as", "images", "of the true class", "examples"], rows, "pairs") + note)


def example_cells(e: Evaluation, pair: ConfusedPair) -> str:
    if e.examples is None:
        return ""
    ex = e.examples
    chosen = np.flatnonzero((ex.true_ids == pair.true_id) & (ex.predicted_ids == pair.predicted_id))
    return "".join(
        img(thumbnail_uri(ex.images[i]),
            f"image #{int(ex.indices[i])}: a {pair.true} predicted as {pair.predicted} "
            f"with confidence {float(ex.confidence[i]):.0%}", "thumb")
        for i in chosen)


def history_section(path: Path, rows: list[dict[str, Any]], canvas: Canvas) -> str:
    uri = canvas.draw(history_figure, rows, title=f"Training history of {path.parent.name or path.name}")
    return section("Training curves", img(uri, f"loss and accuracy per epoch from {path}"), f"from {path}")


# ---- diagnosis ---------------------------------------------------------------------------

def diagnosis_section(doc: dict[str, Any], canvas: Canvas, plots: str | Path | None) -> str:
    verdict = str(doc.get("verdict", "?"))
    banner = (f'<div class="verdict {esc(verdict)}">verdict: <b>{esc(verdict.upper())}</b> — '
              f'{len(doc["findings"])} finding(s), most likely cause first</div>')
    summary = doc.get("summary") or {}
    summary_html = ("<details><summary>all summary numbers</summary>"
                    + table(["summary", "value"], [[esc(k), esc(short(v))] for k, v in summary.items()], "kv")
                    + "</details>") if summary else ""
    findings = "".join(finding_html(i, f) for i, f in enumerate(doc["findings"], 1))
    findings = findings or "<p class='note'>no findings</p>"
    return section("Diagnosis", banner + findings + summary_html + probes_html(doc.get("probes") or [])
                   + diagnosis_plots_html(plots))


def finding_html(number: int, finding: dict[str, Any]) -> str:
    severity = str(finding.get("severity", "info"))
    evidence = finding.get("evidence") or {}
    evidence_html = table(["evidence", "value"], [[esc(k), esc(short(v))] for k, v in evidence.items()],
                          "kv") if evidence else ""
    fix = finding.get("fix")
    return (f'<div class="finding {esc(severity)}"><div class="ftitle">{number}. '
            f'<span class="badge">{esc(severity)}</span> {esc(finding.get("title", ""))} '
            f'<code>{esc(finding.get("id", ""))}</code></div>'
            f'<p>{esc(finding.get("detail", ""))}</p>'
            + (f'<p class="fix">fix: <code>{esc(fix)}</code></p>' if fix else "") + evidence_html + "</div>")


PROBE_COLUMNS = ("accuracy", "pred_entropy", "classes_predicted", "mean_confidence")


def probes_html(probes: list[dict[str, Any]]) -> str:
    if not probes:
        return ""
    rows = [[esc(p.get("name", "?"))] + ([f"skipped: {esc(p['skipped'])}", "", "", ""] if p.get("skipped")
                                         else [esc(short(p.get(c))) for c in PROBE_COLUMNS]) for p in probes]
    return "<h3>Probes: the model re-run under candidate corrections</h3>" + table(
        ["probe", *PROBE_COLUMNS], rows, "probes")


def diagnosis_plots_html(folder: str | Path | None) -> str:
    if folder is None:
        return ""
    files = [(Path(folder) / name, what) for name, what in (
        ("confusion_matrix.png", "the confusion matrix the diagnosis analysed"),
        ("class_histogram.png", "how often each class is predicted vs how often it occurs"))]
    panels = [f"<h3>{esc(what.capitalize())}</h3>" + img(png_uri(path.read_bytes()), what)
              for path, what in files if path.is_file()]
    return row(panels) if panels else ""


def short(value: Any, limit: int = 10) -> str:
    """A value for a table cell: floats to 4 significant digits, long lists cut."""
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        shown = ", ".join(short(v) for v in value[:limit])
        return shown + (f", ... ({len(value)} in all)" if len(value) > limit else "")
    if isinstance(value, dict):
        return json.dumps(value)[:300]
    return str(value)


# ---- the page ---------------------------------------------------------------------------

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px; color: #222; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 18px; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
h3 { font-size: 15px; margin: 6px 0; }
section { margin-bottom: 28px; }
.row { display: grid; gap: 18px; align-items: start; }
.panel { min-width: 0; }
img.fig { max-width: 100%; height: auto; border: 1px solid #eee; }
img.thumb { image-rendering: pixelated; margin: 1px; vertical-align: middle; }
table { border-collapse: collapse; margin: 8px 0; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: middle; }
th { background: #f4f4f4; }
.note, .small { color: #666; font-size: 12px; }
.card { border: 2px solid #9ecae1; border-radius: 6px; padding: 10px 14px; background: #f7fbff; }
.card.low { border-color: #d62728; background: #fff5f5; }
.card .label { font-weight: bold; font-size: 16px; }
.card .big { font-size: 34px; font-weight: bold; }
.verdict { padding: 8px 12px; border-radius: 6px; margin-bottom: 10px; font-size: 16px; }
.verdict.problem { background: #fde0dd; border: 1px solid #d62728; }
.verdict.healthy { background: #e5f5e0; border: 1px solid #31a354; }
.finding { border-left: 5px solid #999; padding: 4px 12px; margin: 10px 0; background: #fafafa; }
.finding.error { border-color: #d62728; } .finding.warning { border-color: #ff7f0e; }
.finding.info { border-color: #1f77b4; }
.ftitle { font-weight: bold; }
.badge { display: inline-block; padding: 0 6px; border-radius: 3px; background: #eee; font-size: 12px; }
.finding.error .badge { background: #d62728; color: white; }
.finding.warning .badge { background: #ff7f0e; color: white; }
.fix code { background: #eef; padding: 1px 4px; }
footer { color: #888; font-size: 12px; margin-top: 30px; }
"""

# No scripts, no fonts, no fetches: only inline styles and data: images may load.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def page(title: str, evals: list[Evaluation], body: str) -> str:
    sources = ", ".join(esc(e.folder or e.label) for e in evals)
    origin = f"evaluations: {sources} · " if sources else ""
    generated = datetime.now().isoformat(timespec="seconds")
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(title)}</title>
<style>{CSS}</style>
</head>
<body>
<h1>{esc(title)}</h1>
<p class="note">{origin}generated {generated} by cifarlab {esc(__version__)}</p>
{body}
<footer>Self-contained: every figure is embedded in this file; no scripts, no network requests.</footer>
</body>
</html>
"""
