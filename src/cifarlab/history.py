"""A run's training history: one row per finished epoch, written as history.csv beside the
model and as JSON inside each checkpoint. One row schema for both; reading validates every
cell once (`cifarlab.schema`), so a plot or a resumed run never meets a half-checked row.

Light on purpose (no torch): `cifarlab report --history` reads it.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from cifarlab.errors import InputError
from cifarlab.fileio import file_problem
from cifarlab.schema import MAX_ITEMS, Fields

HISTORY_COLUMNS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds")
MAX_HISTORY_BYTES = 64 * 2**20  # a million epochs' rows fit in about 60 MiB
HISTORY_HINT = "pass the history.csv that `cifarlab train` wrote into its run folder"


def history_row(f: Fields) -> dict[str, Any]:
    """One epoch's row, checked: validation cells may be empty (None) where it did not run."""
    f.require(*HISTORY_COLUMNS)
    return {"epoch": f.integer("epoch", 1), "train_loss": f.number("train_loss"),
            "train_acc": f.number("train_acc", 0, 1), "val_loss": f.optional_number("val_loss"),
            "val_acc": f.optional_number("val_acc", 0, 1), "lr": f.number("lr"),
            "seconds": f.number("seconds", 0)}


def epochs_in_order(history: list[dict[str, Any]]) -> bool:
    """Whether the rows are epochs 1..n, each once, in order (as training writes them)."""
    return [row["epoch"] for row in history] == list(range(1, len(history) + 1))


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    return f"{value:.6g}" if isinstance(value, float) else value


def history_csv(history: list[dict[str, Any]]) -> bytes:
    """history.csv: one row per epoch, HISTORY_COLUMNS, empty cells for what was not measured."""
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=HISTORY_COLUMNS)
    writer.writeheader()
    for row in history:
        writer.writerow({k: _csv_value(row[k]) for k in HISTORY_COLUMNS})
    return text.getvalue().encode()


def _cell(text: str) -> int | float | str | None:
    """A CSV cell as the JSON value it stands for: empty -> None, "3" -> 3, "0.5" -> 0.5;
    anything else stays text, which the row schema then refuses with its column's name."""
    if text.strip() == "":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def read_history(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a history.csv, every cell checked (numbers finite, accuracies in [0, 1],
    epochs 1..n in order); a file that is not one gives an InputError saying what it is."""
    path = Path(path)
    problem = file_problem(path)
    if problem:
        raise InputError(f"history file {path} {problem}; {HISTORY_HINT}.")
    size = path.stat().st_size
    if size > MAX_HISTORY_BYTES:
        raise InputError(f"{path} holds {size:,} bytes, more than a history.csv can "
                         f"({MAX_HISTORY_BYTES:,}); {HISTORY_HINT}.")
    try:
        lines = path.read_bytes().decode("utf-8").splitlines()
        reader = csv.reader(lines)
        header = next(reader, [])
        missing = [c for c in HISTORY_COLUMNS if c not in header]
        if missing:
            raise InputError(f"{path} is missing columns {missing}; expected a header "
                             f"{','.join(HISTORY_COLUMNS)} as written by training.")
        rows = [_csv_row(path, header, cells, reader.line_num) for cells in reader if cells]
    except UnicodeDecodeError as exc:
        raise InputError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start:,}); {HISTORY_HINT}.") from None
    except csv.Error as exc:  # a field over csv's 128 KiB limit, a stray NUL byte
        raise InputError(f"{path}, line {reader.line_num}: not CSV ({exc}); {HISTORY_HINT}.") from None
    if not rows:
        raise InputError(f"{path} has a header but no epochs; train for at least one epoch first.")
    if len(rows) > MAX_ITEMS:
        raise InputError(f"{path} holds {len(rows):,} epochs, more than {MAX_ITEMS:,}; {HISTORY_HINT}.")
    if not epochs_in_order(rows):
        raise InputError(f"{path}: the epochs must be 1..{len(rows)} in order, got "
                         f"{', '.join(str(row['epoch']) for row in rows[:8])}...; {HISTORY_HINT}.")
    return rows


def _csv_row(path: Path, header: list[str], cells: list[str], line: int) -> dict[str, Any]:
    where = f"{path}, line {line}"
    if len(cells) != len(header):
        raise InputError(f"{where} has {len(cells)} cells, the header {len(header)}; {HISTORY_HINT}.")
    return history_row(Fields({k: _cell(v) for k, v in zip(header, cells)}, where, HISTORY_HINT))
