"""From a validated fal request to the stored job input (``Job.input``), and the validation
the neighbouring skins (BFL's, OpenAI's) borrow: they translate their requests into the input
of a fal endpoint (PROTOCOL.md §8) and submit it to the same queue, so workers need no change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from kontext_server.http.fal.schemas import ENDPOINTS, FalInput

__all__ = ["FieldError", "stored_input", "validate_fal_input"]


@dataclass(frozen=True, slots=True)
class FieldError:
    """One invalid field, named the way the fal input names it (``loc``)."""

    loc: tuple[str | int, ...]
    message: str
    kind: str


def stored_input(validated: FalInput) -> dict[str, Any]:
    """What ``Job.input`` stores for a validated fal input: the only place that makes it."""
    return validated.model_dump(mode="json")


def validate_fal_input(
    endpoint: str, fal_input: dict[str, Any], *, max_data_uri_bytes: int
) -> tuple[dict[str, Any], list[FieldError]]:
    """``fal_input`` validated by the endpoint's input model: the stored JSON and no errors,
    or ``{}`` and the errors with the model's messages (they say what is allowed)."""
    model = ENDPOINTS[endpoint]
    try:
        validated = model.model_validate(
            fal_input, context={"max_data_uri_bytes": max_data_uri_bytes}
        )
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        return {}, [FieldError(tuple(e["loc"]), str(e["msg"]), str(e["type"])) for e in errors]
    return stored_input(validated), []
