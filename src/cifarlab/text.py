"""Small helpers for the words cifarlab prints."""

from __future__ import annotations


def plural(count: int, noun: str) -> str:
    """"1 epoch", "3 epochs", "0 epochs" (regular English nouns only)."""
    return f"{count:,} {noun}" if count == 1 else f"{count:,} {noun}s"
