"""Reading the JSON documents that files bring in: each field's type and range checked once.

A record's `from_dict` reads its document through `Fields`, so an edited, damaged or foreign
file fails where it enters, with the file and the field named, and nothing downstream
checks again. Numbers must be finite; booleans are not numbers; strings and lists are
bounded so that a hostile document cannot make the reader's work grow without limit.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from functools import cached_property
from pathlib import Path
from typing import Any, NoReturn

from cifarlab.errors import InputError
from cifarlab.fileio import file_problem

MAX_STRING = 10_000  # characters in one name or label
MAX_ITEMS = 1_000_000  # entries in one list (a 1,000-class matrix's rows, per-class rows, ...)
MAX_JSON_BYTES = 2**30  # a 10,000-class cm.json of 8-digit counts is about 0.9 GiB


def read_json_file(path: Path, expected: str, error: type[Exception] = InputError) -> Any:
    """The JSON value in `path`, a regular file of at most MAX_JSON_BYTES: a FIFO or a device
    (which would block or never end) is refused by its type before it is opened, and
    damaged JSON, non-UTF-8 text, nesting beyond Python's recursion limit and integers
    beyond its 4,300-digit limit are all one error naming the file and what was `expected`."""
    problem = file_problem(path)
    if problem:
        raise error(f"{path} {problem}; expected {expected}.")
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise error(f"{path} holds {size:,} bytes, more than the {MAX_JSON_BYTES:,} a JSON "
                    f"input may; expected {expected}.")
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # ValueError: JSON, UTF-8 and 4,300+ digit ints
        raise error(f"{path} is not valid JSON ({type(exc).__name__}: {str(exc)[:200]}); expected "
                    f"{expected}. Write it again with the command that made it.") from None


def describe(value: Any, limit: int = 40) -> str:
    """A short, printable account of a value for an error message."""
    text = repr(value)
    text = text if len(text) <= limit else text[:limit] + "..."
    return f"{type(value).__name__} {text}"


class Fields:
    """One JSON object read field by field; errors name `where` and the field."""

    def __init__(self, data: Any, where: str, hint: str = "", error: type[Exception] = InputError):
        self.where, self.hint, self.error = where, hint, error
        if not isinstance(data, dict):
            self.fail(f"{where} must hold a JSON object, got {describe(data)}")
        self.data: dict[str, Any] = data

    def fail(self, message: str) -> NoReturn:
        raise self.error(f"{message}{'; ' + self.hint if self.hint else ''}")

    def require(self, *keys: str) -> None:
        """Every key present; the message lists all the missing ones at once."""
        missing = [key for key in keys if key not in self.data]
        if missing:
            given = ", ".join(list(self.data)[:8]) or "none"
            self.fail(f"{self.where} lacks {', '.join(missing)} (keys given: {given})")

    def _bad(self, key: str, expected: str) -> NoReturn:
        self.fail(f"{self.where}: {key!r} must be {expected}, got {describe(self.data.get(key))}")

    def has(self, key: str) -> bool:
        return self.data.get(key) is not None

    def string(self, key: str) -> str:
        value = self.data.get(key)
        if not isinstance(value, str) or len(value) > MAX_STRING:
            self._bad(key, f"a string of at most {MAX_STRING:,} characters")
        return value

    def optional_string(self, key: str) -> str | None:
        return self.string(key) if self.has(key) else None

    def number(self, key: str, low: float = -math.inf, high: float = math.inf) -> float:
        value = self.data.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or not low <= value <= high:
            unbounded = (low, high) == (-math.inf, math.inf)
            self._bad(key, "a number (finite)" if unbounded else f"a number in [{low:g}, {high:g}]")
        return float(value)

    def optional_number(self, key: str, low: float = -math.inf, high: float = math.inf) -> float | None:
        return self.number(key, low, high) if self.has(key) else None

    def channels(self, key: str, low: float, high: float) -> list[float]:
        """Three per-channel numbers in [low, high] (a mean, a std, ...)."""
        values = self.data.get(key)
        if not isinstance(values, list) or len(values) != 3:
            self._bad(key, "3 per-channel numbers")
        return [Fields({key: v}, self.where, self.hint, self.error).number(key, low, high) for v in values]

    def integer(self, key: str, low: int = 0, high: int = 2**63 - 1) -> int:
        value = self.data.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            self._bad(key, f"an integer in [{low:,}, {high:,}]")
        return value

    def strings(self, key: str) -> list[str]:
        value = self.data.get(key)
        if not isinstance(value, list) or len(value) > MAX_ITEMS \
                or not all(isinstance(v, str) and len(v) <= MAX_STRING for v in value):
            self._bad(key, "a list of strings")
        return list(value)

    def objects(self, key: str) -> list[Fields]:
        """A list of JSON objects, each read as Fields named by its position."""
        value = self.data.get(key)
        if not isinstance(value, list) or len(value) > MAX_ITEMS:
            self._bad(key, f"a list of at most {MAX_ITEMS:,} objects")
        return [Fields(item, f"{self.where}: {key}[{i}]", self.hint, self.error) for i, item in enumerate(value)]

    def object(self, key: str) -> Fields:
        return Fields(self.data.get(key), f"{self.where}: {key!r}", self.hint, self.error)

    def optional_object(self, key: str) -> Fields | None:
        return self.object(key) if self.has(key) else None

    def optional_dict(self, key: str) -> dict[str, Any] | None:
        """A JSON object carried through as it is (shown, never computed with)."""
        return self.object(key).data if self.has(key) else None


def matches_annotation(value: Any, annotation: str) -> bool:
    """Whether a JSON value fits a dataclass field's annotation ("int | None", "float",
    "dict[str, Any]", ...): bool is not an int, an int is a float, NaN and inf are not numbers."""
    for kind in annotation.replace(" ", "").split("|"):
        if kind == "None" and value is None:
            return True
        if kind == "bool" and isinstance(value, bool):
            return True
        if kind == "str" and isinstance(value, str) and len(value) <= MAX_STRING:
            return True
        if kind == "int" and isinstance(value, int) and not isinstance(value, bool):
            return True
        if kind == "float" and isinstance(value, (int, float)) and not isinstance(value, bool) \
                and math.isfinite(value):
            return True
        if kind.startswith("dict") and isinstance(value, dict):
            return True
    return False


class DocumentView(Mapping[str, Any]):
    """A record that also reads as the JSON document it is written as: `record["classes"]`,
    `dict(record)`, `record.get("split")`, as its callers read the dict it replaced."""

    def document(self) -> dict[str, Any]:
        """The JSON document the view shows (the subclass's `to_dict()`, maybe more)."""
        raise NotImplementedError

    @cached_property
    def _view(self) -> dict[str, Any]:
        return self.document()

    def __getitem__(self, key: str) -> Any:
        return self._view[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._view)

    def __len__(self) -> int:
        return len(self._view)
