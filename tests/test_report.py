"""The HTML report: what it embeds, that it escapes, and how it refuses bad inputs.

The evaluation folders come from a real (tiny) model through `evaluate` (report_fixtures.py);
the page is checked by reading the HTML. tests/test_report_browser.py opens it in Chromium.
"""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from report_fixtures import BROKEN_LABEL, CORRECT_LABEL, ReportRun

from cifarlab.cli import main
from cifarlab.diagnosis import diagnose
from cifarlab.errors import CifarlabError
from cifarlab.metrics import classification_report
from cifarlab.report import write_report

IMG_SRC = re.compile(r'<img class="([a-z]+)" src="([^"]*)"')
FIGURES_PER_EVALUATION = 4  # confusion matrix, coarse matrix, class histogram, per-class accuracy


def images_in(page: str) -> list[tuple[str, Image.Image]]:
    """Every <img> as (class, decoded PNG); fails unless each is an embedded PNG."""
    found = []
    for cls, src in IMG_SRC.findall(page):
        assert src.startswith("data:image/png;base64,"), src[:60]
        picture = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        assert picture.format == "PNG"
        found.append((cls, picture))
    assert len(found) == page.count("<img"), "an <img> without an embedded PNG"
    return found


def num_examples(folder: Path) -> int:
    with np.load(folder / "confused_examples.npz") as npz:
        return len(npz["indices"])


# ---- evaluate's example images ---------------------------------------------------------------

def test_evaluate_stores_examples_of_the_most_confused_pairs(report_run: ReportRun) -> None:
    folder = report_run.broken
    metrics = json.loads((folder / "metrics.json").read_text())
    probs, labels = np.load(folder / "probs.npy"), np.load(folder / "labels.npy")
    with np.load(folder / "confused_examples.npz") as npz:
        ex = {key: npz[key] for key in npz.files}
    assert ex["images"].dtype == np.uint8 and ex["images"].shape[1:] == (32, 32, 3)
    assert len(ex["images"]) > 0
    for rank, pair in enumerate(metrics["most_confused"][:5]):
        rows = np.flatnonzero(ex["pair"] == rank)
        assert len(rows) == min(4, pair["count"])
        assert (ex["true_ids"][rows] == pair["true_id"]).all()
        assert (ex["predicted_ids"][rows] == pair["predicted_id"]).all()
        # The most confident mistakes first.
        assert (np.diff(ex["confidence"][rows]) <= 0).all()
    index = ex["indices"]
    assert (labels[index] == ex["true_ids"]).all() and (probs[index].argmax(1) == ex["predicted_ids"]).all()
    np.testing.assert_array_equal(ex["images"], report_run.dataset.test_x[index] // 255)  # what was evaluated


# ---- the page ---------------------------------------------------------------------------

def test_two_evaluations_side_by_side(report_run: ReportRun, tmp_path: Path) -> None:
    out = write_report(tmp_path / "sub" / "report.html", evaluations=[report_run.correct, report_run.broken],
                       history=report_run.model_path.parent / "history.csv")
    page = out.read_text(encoding="utf-8")

    images = images_in(page)
    thumbs = [picture for cls, picture in images if cls == "thumb"]
    figures = [picture for cls, picture in images if cls == "fig"]
    assert len(figures) == 2 * FIGURES_PER_EVALUATION + 1  # + the training curves
    assert len(thumbs) == num_examples(report_run.correct) + num_examples(report_run.broken) > 0
    assert all(t.size == (96, 96) for t in thumbs)  # 32x32 upscaled 3x
    assert page.count('class="card ') == 2 and 'class="card low"' in page  # the broken one stands out
    for text in ["Confusion matrix", "Superclass (coarse) confusion matrix", "Predicted vs true class counts",
                 "Per-class accuracy", "Most-confused pairs", "Training curves", "warm", "cold", "test split"]:
        assert text in page, text
    for name in report_run.dataset.classes:
        assert f"{name} " in page  # in the per-class "lowest" line and the pairs table
    accuracy = json.loads((report_run.correct / "metrics.json").read_text())["accuracy"]
    assert f"<b>{accuracy:.1%}</b>" in page


def test_page_is_self_contained_and_escaped(report_run: ReportRun, tmp_path: Path) -> None:
    page = write_report(tmp_path / "r.html", evaluations=[report_run.correct, report_run.broken]).read_text()
    assert "<script" not in page.lower()
    assert not re.search(r'(src|href)="(?!data:)', page), "everything must be embedded"
    assert "Content-Security-Policy" in page and "default-src 'none'" in page
    assert BROKEN_LABEL not in page and "raw &lt;pixels&gt; &amp; /255" in page
    assert f"cifarlab report — {CORRECT_LABEL} vs raw &lt;pixels&gt;" in page


def test_class_names_are_escaped(tmp_path: Path) -> None:
    names = ["<script>alert(1)</script>", "cat & dog", 'say "hi"', "plain"]
    y = np.repeat(np.arange(4), 5)
    probs = np.full((20, 4), 0.1)
    probs[np.arange(20), (y + (np.arange(20) % 5 == 0)) % 4] = 0.7  # 4 mistakes, one per class
    metrics = classification_report(probs, y, names)  # the dict evaluate builds on, no folder
    page = write_report(tmp_path / "r.html", evaluations=[metrics]).read_text()
    assert "<script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "cat &amp; dog" in page
    assert "say &quot;hi&quot;" in page
    assert "no confused_examples.npz" in page  # a dict with no folder has no example images
    assert len(images_in(page)) == 3  # confusion matrix, histogram, per-class accuracy


def test_diagnosis_findings_are_rendered(report_run: ReportRun, tmp_path: Path) -> None:
    broken = report_run.broken
    diagnosis = diagnose(predictions=broken / "probs.npy", labels=broken / "labels.npy")
    assert diagnosis.verdict == "problem"
    path = tmp_path / "diag.json"
    path.write_text(diagnosis.to_json())  # as `cifarlab diagnose --json > diag.json`
    page = write_report(tmp_path / "r.html", evaluations=[], diagnosis=path).read_text()
    assert "verdict: <b>PROBLEM</b>" in page
    for finding in diagnosis.to_dict()["findings"]:
        assert f"<code>{finding['id']}</code>" in page
        assert f'<span class="badge">{finding["severity"]}</span>' in page
        for text in (finding["title"], finding["detail"], finding["fix"]):
            assert escape(text) in page
    assert "cifarlab report — diagnosis" in page
    assert "<img" not in page  # a diagnosis document alone has no figures


def test_colour_options_reach_the_figures(report_run: ReportRun, tmp_path: Path) -> None:
    plain = write_report(tmp_path / "a.html", evaluations=[report_run.correct]).read_text()
    styled = write_report(tmp_path / "b.html", evaluations=[report_run.correct], cm_scale="log",
                          mask_diagonal=True).read_text()
    assert "(log colour scale, diagonal masked)" in styled and "diagonal masked" not in plain
    first_figure = [src for _, src in IMG_SRC.findall(plain)][0]
    assert first_figure not in styled  # a differently drawn confusion matrix


def escape(text: str) -> str:
    import html

    return html.escape(text, quote=True)


# ---- bad inputs -------------------------------------------------------------------------

def _missing(tmp_path: Path) -> dict:
    return {"evaluations": [tmp_path / "nope"]}


def _no_metrics(tmp_path: Path) -> dict:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "cm.json").write_text("[[1, 0], [0, 1]]")
    return {"evaluations": [tmp_path / "empty"]}


def _bad_json(tmp_path: Path) -> dict:
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "metrics.json").write_text("{not json")
    return {"evaluations": [tmp_path / "bad"]}


def _not_metrics(tmp_path: Path) -> dict:
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "metrics.json").write_text('{"loss": 1.0}')
    return {"evaluations": [tmp_path / "other"]}


def _bad_diagnosis(tmp_path: Path) -> dict:
    (tmp_path / "d.json").write_text('{"accuracy": 0.1}')
    return {"evaluations": [], "diagnosis": tmp_path / "d.json"}


@pytest.mark.parametrize("make,message", [
    (_missing, "does not exist; expected a folder written by `cifarlab evaluate`"),
    (_no_metrics, "has no metrics.json (it holds: cm.json)"),
    (_bad_json, "is not valid JSON"),
    (_not_metrics, "lacks accuracy, per_class"),
    (_bad_diagnosis, "cifarlab diagnose ... --json"),
    (lambda tmp_path: {"evaluations": []}, "nothing to report"),
    (lambda tmp_path: {"evaluations": [], "diagnosis": tmp_path / "x.json"}, "x.json does not exist"),
])
def test_bad_inputs_say_what_was_expected(make, message: str, tmp_path: Path) -> None:
    with pytest.raises(CifarlabError) as info:
        write_report(tmp_path / "r.html", **make(tmp_path))
    assert message in str(info.value)
    assert not (tmp_path / "r.html").exists()


def test_bad_options(report_run: ReportRun, tmp_path: Path) -> None:
    with pytest.raises(CifarlabError, match="cm_scale must be one of linear, log, got 'sqrt'"):
        write_report(tmp_path / "r.html", evaluations=[report_run.correct], cm_scale="sqrt")
    with pytest.raises(CifarlabError, match="history file .* does not exist"):
        write_report(tmp_path / "r.html", evaluations=[report_run.correct], history=tmp_path / "h.csv")


# ---- the command line -------------------------------------------------------------------

def test_cli_report(report_run: ReportRun, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "report.html"
    assert main(["report", str(report_run.correct), str(report_run.broken), "--cm-scale", "log",
                 "--title", "A & B", "--out", str(out)]) == 0
    assert f"report: {out}" in capsys.readouterr().out
    page = out.read_text()
    assert "<title>A &amp; B</title>" in page and "log colour scale" in page

    assert main(["report", str(tmp_path / "missing"), "--out", str(tmp_path / "x.html")]) == 2
    err = capsys.readouterr().err
    assert "cifarlab: error: evaluation folder" in err and "Traceback" not in err


def test_cli_evaluate_report_includes_the_run_history(report_run: ReportRun, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("CIFARLAB_HOME", str(report_run.cache))  # the dataset is decoded there already
    out = tmp_path / "eval.html"
    assert main(["evaluate", str(report_run.model_path), "--data", str(report_run.data_dir), "--out",
                 str(tmp_path / "eval"), "--report", str(out), "--quiet"]) == 0
    assert f"report: {out}" in capsys.readouterr().out
    page = out.read_text()
    assert "Training curves" in page and "Most-confused pairs" in page and "eval</div>" in page


def test_cli_diagnose_report_shows_the_matrix_it_analysed(report_run: ReportRun, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "diag.html"
    code = main(["diagnose", "--predictions", str(report_run.broken / "probs.npy"),
                 "--labels", str(report_run.broken / "labels.npy"), "--json", "--report", str(out)])
    assert code == 1  # a problem was found
    assert json.loads(capsys.readouterr().out)["verdict"] == "problem"  # stdout stays pure JSON
    page = out.read_text()
    assert "<code>prediction-collapse</code>" in page
    assert "The confusion matrix the diagnosis analysed" in page and len(images_in(page)) == 2


@pytest.mark.parametrize("doc,message", [
    ({"verdict": "problem", "findings": [5]}, "findings[0] must hold a JSON object"),
    ({"verdict": "problem", "findings": [{"title": ["x"]}]}, "'title' must be a string"),
    ({"verdict": "problem", "findings": [{"evidence": [1, 2]}]}, "'evidence' must hold a JSON object"),
    ({"verdict": "problem", "findings": [], "summary": "big"}, "'summary' must hold a JSON object"),
    ({"verdict": "problem", "findings": [], "probes": ["as-given"]}, "probes[0] must hold a JSON object"),
    ({"verdict": 1, "findings": []}, "'verdict' must be a string"),
])
def test_a_damaged_diagnosis_document_is_refused_with_the_field_named(tmp_path: Path, doc: dict, message: str) -> None:
    (tmp_path / "d.json").write_text(json.dumps(doc))
    with pytest.raises(CifarlabError) as info:
        write_report(tmp_path / "r.html", evaluations=[], diagnosis=tmp_path / "d.json")
    assert message in str(info.value) and "cifarlab diagnose ... --json" in str(info.value)
    assert not (tmp_path / "r.html").exists()
