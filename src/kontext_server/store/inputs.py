"""A job's input as the stores keep it, and as they read rows written before it was typed.

The ``input`` column holds ``EditInput.to_record()`` (``"v": 1``) plus, for a job that came
through a protocol that needs something back later, ``"api"`` (the skin's name) and
``"api_data"`` (its own JSON: e.g. the BFL skin's webhook secret). Neither is part of the
edit, and neither is ever rendered to a client.

Rows written before (no ``"v"``) hold the fal endpoint input as validated then: ``image_url``
or ``image_urls``, ``sync_mode``, ``safety_tolerance`` as a string, fal [dev]'s
``resolution_mode``, and BFL jobs' ``"bfl_api"`` options. ``decode_input`` maps them the way the
worker read them (the same defaults); ``InputsUpgrade`` is the schema migration (v4 on both
stores) that rewrites old rows, and reading them stays possible: an API process of the
previous version may still be submitting while a new one migrates.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from kontext_server.domain.editing import (
    DEFAULT_GUIDANCE_SCALE,
    DEFAULT_SAFETY_TOLERANCE,
    REQUEST_ACCELERATIONS,
    SAFETY_TOLERANCES,
    EditInput,
    OutputFormat,
    RequestAcceleration,
)

__all__ = [
    "LEGACY_BFL_KEY",
    "InputsUpgrade",
    "Migration",
    "decode_input",
    "encode_input",
    "upgrade_record",
]

# One step of a schema migration: a statement, or a function of the migration's ``execute``.
Migration = str | Callable[[Callable[..., Any]], None]

UPGRADE_BATCH = 500  # old rows read and rewritten per statement by ``InputsUpgrade``

# Where rows written before the typed input kept a BFL job's options (the skin's name since).
LEGACY_BFL_KEY = "bfl_api"


def encode_input(
    edit: EditInput, api: str | None = None, api_data: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The JSON of the ``input`` column."""
    record = edit.to_record()
    if api is not None or api_data is not None:
        record["api"] = api
        record["api_data"] = dict(api_data) if api_data is not None else None
    return record


def decode_input(data: Mapping[str, Any]) -> tuple[EditInput, str | None, dict[str, Any] | None]:
    """``(edit, api, api_data)`` of a stored ``input`` column, new or old."""
    if EditInput.is_record(data):
        api_data = data.get("api_data")
        return EditInput.from_record(data), data.get("api"), api_data
    return _legacy_edit(data), *_legacy_api(data)


def upgrade_record(data: Mapping[str, Any]) -> dict[str, Any] | None:
    """The new JSON for an old row's input; None when it is new already."""
    if EditInput.is_record(data):
        return None
    return encode_input(*decode_input(data))


@dataclass(frozen=True, slots=True)
class InputsUpgrade:
    """A migration step: rewrites every old row's ``input`` (``upgrade_record``), a batch at
    a time in ``seq`` order, inside the migration's transaction. ``select_old`` takes the
    last ``seq`` seen and a batch size (``UPGRADE_BATCH``) and returns the next ``(seq,
    input)`` rows still old (the input as JSON text), so each row is read once however many
    there are. ``update`` takes ``(input, seq)`` of one row, or with ``batched`` the list of
    the batch's inputs and the list of their seqs in one statement (PostgreSQL: 8.2 s for
    100k rows instead of 23.4 s with a round trip per row; ``benchmarks/migrate_inputs.py``)."""

    select_old: str
    update: str
    batched: bool = False

    def __call__(self, execute: Callable[..., Any]) -> None:
        after = 0
        while rows := execute(self.select_old, (after, UPGRADE_BATCH)).fetchall():
            new = [_upgraded_text(row["input"]) for row in rows]
            seqs = [row["seq"] for row in rows]
            if self.batched:
                execute(self.update, (new, seqs))
            else:
                for text, seq in zip(new, seqs, strict=True):
                    execute(self.update, (text, seq))
            after = seqs[-1]


def _upgraded_text(text: str) -> str:
    new = upgrade_record(json.loads(text))
    assert new is not None, "the select returns old rows only"
    return json.dumps(new, separators=(",", ":"), ensure_ascii=False)  # as rows.dumps writes


def _legacy_edit(data: Mapping[str, Any]) -> EditInput:
    aspect_ratio, match_input_size = _legacy_sizing(data)
    output_format: OutputFormat = "png" if data.get("output_format") == "png" else "jpeg"
    acceleration = data.get("acceleration")
    steps = data.get("num_inference_steps")
    seed = data.get("seed")
    return EditInput(
        prompt=str(data.get("prompt", "")),
        references=_legacy_references(data),
        seed=None if seed is None else int(seed),
        guidance_scale=float(data.get("guidance_scale", DEFAULT_GUIDANCE_SCALE)),
        num_inference_steps=None if steps is None else int(steps),
        num_images=int(data.get("num_images", 1)),
        aspect_ratio=aspect_ratio,
        match_input_size=match_input_size,
        output_format=output_format,
        inline_output=bool(data.get("sync_mode", False)),
        safety_tolerance=_legacy_safety(data.get("safety_tolerance")),
        enhance_prompt=bool(data.get("enhance_prompt", False)),
        acceleration=_accel(acceleration),
    )


def _accel(value: Any) -> RequestAcceleration | None:
    known: tuple[RequestAcceleration, ...] = REQUEST_ACCELERATIONS
    return next((name for name in known if name == value), None)


def _legacy_references(data: Mapping[str, Any]) -> tuple[str, ...]:
    if "image_urls" in data:
        return tuple(str(url) for url in data["image_urls"])
    if "image_url" in data:
        return (str(data["image_url"]),)
    return ()


def _legacy_sizing(data: Mapping[str, Any]) -> tuple[str | None, bool]:
    """fal [dev]'s ``resolution_mode``: "auto" is the bucket nearest the input, "match_input"
    the input's own size, a ratio that ratio; other endpoints kept ``aspect_ratio``."""
    mode = data.get("resolution_mode")
    if mode is None:
        ratio = data.get("aspect_ratio")
        return (None if ratio is None else str(ratio)), False
    if mode == "match_input":
        return None, True
    if mode == "auto":
        return None, False
    return str(mode), False


def _legacy_safety(raw: Any) -> int:
    """fal's "1".."6" (or an int); anything else was read as the default then."""
    try:
        level = int(str(raw))
    except ValueError:
        return DEFAULT_SAFETY_TOLERANCE
    return level if level in SAFETY_TOLERANCES else DEFAULT_SAFETY_TOLERANCE


def _legacy_api(data: Mapping[str, Any]) -> tuple[str | None, dict[str, Any] | None]:
    options = data.get(LEGACY_BFL_KEY)
    if isinstance(options, dict):
        return "bfl", dict(options)
    return None, None
