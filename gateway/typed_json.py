"""Strict readers for the fields of JSON records that cross process boundaries.

Another process wrote the record, possibly another release of the gateway, or it was cut short or
edited by hand: every reader checks each field's type instead of trusting it, and a record that does
not fit fails as a whole with one `RecordError` that says which field and why. No coercion: "5" is not
5, and true is not 1 (bool is an int in Python, never in these records).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Hashable
from typing import Any, TypeGuard, TypeVar

T = TypeVar("T")


class RecordError(ValueError):
    """A record that is not valid JSON, or whose fields do not have the expected types."""


def parse_json(raw: bytes | str) -> object:
    """JSON text to Python values; truncated text or bytes that are not UTF-8 raise RecordError."""
    try:
        return json.loads(raw)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are both ValueErrors
        raise RecordError(f"not JSON: {exc}") from exc


def _kind(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


class Fields:
    """One JSON object being read; each accessor names the field's path in its error."""

    def __init__(self, data: object, where: str) -> None:
        if not isinstance(data, dict):
            raise RecordError(f"{where}: expected an object, got {_kind(data)}")
        self.data: dict[str, Any] = data
        self.where = where

    def _get(self, name: str) -> object:
        if name not in self.data:
            raise RecordError(f"{self.where}.{name}: missing")
        return self.data[name]

    def _fail(self, name: str, expected: str, value: object) -> RecordError:
        return RecordError(f"{self.where}.{name}: expected {expected}, got {_kind(value)}")

    def has(self, name: str) -> bool:
        return name in self.data

    def text(self, name: str) -> str:
        value = self._get(name)
        if not isinstance(value, str):
            raise self._fail(name, "a string", value)
        return value

    def optional_text(self, name: str) -> str | None:
        """A field that must be present and may be null."""
        return None if self._get(name) is None else self.text(name)

    def flag(self, name: str) -> bool:
        value = self._get(name)
        if not isinstance(value, bool):
            raise self._fail(name, "true or false", value)
        return value

    def integer(self, name: str) -> int:
        value = self._get(name)
        if _is_int(value):
            return value
        raise self._fail(name, "a whole number", value)

    def number(self, name: str) -> float:
        value = self._get(name)
        if _is_number(value):
            return float(value)
        raise self._fail(name, "a number", value)

    def optional_number(self, name: str) -> float | None:
        """A field that must be present and may be null."""
        return None if self._get(name) is None else self.number(name)

    def integers(self, name: str) -> tuple[int, ...]:
        return tuple(self._items(name, _is_int, "whole numbers"))

    def numbers(self, name: str) -> tuple[float, ...]:
        return tuple(float(x) for x in self._items(name, _is_number, "numbers"))

    def texts(self, name: str) -> tuple[str, ...]:
        return tuple(self._items(name, lambda x: isinstance(x, str), "strings"))

    def _items(self, name: str, check: Callable[[object], bool], what: str) -> list[Any]:
        values = self.items(name)
        for i, value in enumerate(values):
            if not check(value):
                raise RecordError(f"{self.where}.{name}[{i}]: expected {what}, got {_kind(value)}")
        return values

    def items(self, name: str) -> list[Any]:
        value = self._get(name)
        if not isinstance(value, list):
            raise self._fail(name, "a list", value)
        return value

    def child(self, name: str) -> Fields:
        return Fields(self._get(name), f"{self.where}.{name}")

    def entry(self, name: str, index: int) -> Fields:
        """The object at `index` of the list field `name`."""
        return Fields(self.items(name)[index], f"{self.where}.{name}[{index}]")

    def entries(self, name: str) -> list[Fields]:
        return [self.entry(name, i) for i in range(len(self.items(name)))]

    def mapping(self, name: str, read: Callable[[Fields], T]) -> dict[str, T]:
        """An object whose values are objects of one kind, each read by `read`."""
        inner = self.child(name)
        return {key: read(inner.child(key)) for key in inner.data}

    def json_object(self, name: str) -> dict[str, Any]:
        """An object of free-form JSON (evidence, metadata), checked only for being an object."""
        return self.child(name).data


class WarnOnce:
    """Remembers what was last reported per subject, so a reader polling every second logs a bad record
    once, and again only when it changes (a new mtime, a different reason)."""

    def __init__(self) -> None:
        self._last: dict[Hashable, Hashable] = {}

    def first(self, subject: Hashable, version: Hashable) -> bool:
        if self._last.get(subject) == version:
            return False
        self._last[subject] = version
        return True

    def forget(self, subject: Hashable) -> None:
        self._last.pop(subject, None)
