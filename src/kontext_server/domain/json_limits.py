"""Reading untrusted JSON with explicit limits: every route and header that takes JSON parses
it here, never with ``json.loads`` directly.

The parser is pydantic-core's ``from_json`` (jiter, in Rust, already a dependency through
pydantic): it refuses what the standard library lets through and later code cannot store or
print (lone surrogates, ``NaN``/``Infinity``), refuses integers past Python's int-to-string
limit quickly (instead of raising ``ValueError`` deep inside ``int()``), and has no Python
recursion to exhaust. On top of it, ``parse_json`` enforces this server's own limits, which
``docs/security.md`` lists:

* nesting depth: at most ``MAX_DEPTH`` arrays/objects inside each other;
* numbers: integers of at most ``MAX_INT_DIGITS`` digits, other numbers finite (``1e400``
  is refused, not read as infinity);
* values: at most ``MAX_VALUES`` in one document (every object, array, string, number,
  boolean and null counts once);
* strings: no NUL character (``\\u0000``): PostgreSQL cannot store it in text or ``jsonb``,
  and no field of ours has a use for it.

The body size is bounded by the caller (each route has its own cap) before this is called.
Duplicate keys in an object: the last one wins (RFC 8259 leaves it open; the standard
library does the same).

A violation raises ``JSONLimitError``, whose message says what was wrong and what is allowed.
"""

from __future__ import annotations

import math
from typing import Any

import pydantic_core

__all__ = [
    "MAX_DEPTH",
    "MAX_INT_DIGITS",
    "MAX_VALUES",
    "JSONLimitError",
    "json_rules",
    "parse_json",
]

MAX_DEPTH = 32  # fal, BFL and storage bodies nest at most 2 deep
MAX_INT_DIGITS = 64  # seeds are below 2**63 (19 digits)
MAX_VALUES = 10_000  # a /multi body has ~20
_MAX_INT = 10**MAX_INT_DIGITS


class JSONLimitError(ValueError):
    """The text is not JSON this server reads; ``str(exc)`` says why and what is allowed.
    ``position`` is the character offset of the problem when the parser knows it."""

    def __init__(self, message: str, *, position: int | None = None) -> None:
        super().__init__(message)
        self.position = position


def json_rules() -> str:
    """The limits in words, for error messages."""
    return (
        f"JSON nested at most {MAX_DEPTH} deep, with integers of at most {MAX_INT_DIGITS} "
        f"digits, finite numbers, strings without NUL and at most {MAX_VALUES:,} values"
    )


def parse_json(data: bytes | str) -> Any:
    """The JSON value in ``data`` (UTF-8 bytes or text), within the limits above; raises
    ``JSONLimitError`` otherwise."""
    try:
        value = pydantic_core.from_json(data, allow_inf_nan=False, cache_strings="keys")
    except ValueError as exc:
        raise _parse_error(str(exc)) from None
    _check(value)
    return value


def _parse_error(reason: str) -> JSONLimitError:
    if reason.startswith("recursion limit exceeded"):
        reason = f"it is nested more than {MAX_DEPTH} deep"
    elif reason.startswith("number out of range"):
        reason = f"it has an integer of more than {MAX_INT_DIGITS} digits"
    return JSONLimitError(f"not valid JSON: {reason}", position=_position(reason))


def _position(reason: str) -> int | None:
    """jiter says ``... at line L column C``; the column, counted from 0, for one-line bodies
    (what clients send), else None."""
    _, found, where = reason.rpartition(" at line ")
    if not found:
        return None
    line, _, column = where.partition(" column ")
    if line != "1" or not column.isdigit():
        return None
    return int(column) - 1


def _check(value: Any) -> None:
    """Depth, number and count limits, without recursion (an explicit stack)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    count = 0
    while stack:
        item, depth = stack.pop()
        count += 1
        if count > MAX_VALUES:
            raise JSONLimitError(f"the JSON document has more than {MAX_VALUES:,} values")
        if isinstance(item, dict):
            if any("\x00" in key for key in item):
                raise JSONLimitError("the JSON document has a key with a NUL character (\\u0000)")
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            _check_scalar(item)
            continue
        if depth > MAX_DEPTH:
            raise JSONLimitError(f"the JSON document is nested more than {MAX_DEPTH} deep")
        stack.extend((child, depth + 1) for child in children)


def _check_scalar(item: Any) -> None:
    if isinstance(item, str):
        if "\x00" in item:
            raise JSONLimitError("the JSON document has a string with a NUL character (\\u0000)")
        return
    if isinstance(item, bool):
        return
    if isinstance(item, int) and not -_MAX_INT < item < _MAX_INT:
        raise JSONLimitError(
            f"the JSON document has an integer of more than {MAX_INT_DIGITS} digits"
        )
    if isinstance(item, float) and not math.isfinite(item):
        raise JSONLimitError(
            "the JSON document has a number too large to represent (finite numbers only)"
        )
