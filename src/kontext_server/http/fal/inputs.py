"""From a validated fal request to the typed edit (``EditInput``, what ``Job.input`` is), and
the validation the neighbouring skins (BFL's, OpenAI's) borrow: they translate their requests
into the input of a fal endpoint (PROTOCOL.md §8), so every field is judged by one set of
rules and messages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from kontext_server.domain.editing import DEFAULT_SAFETY_TOLERANCE, EditInput
from kontext_server.http.fal.schemas import ENDPOINTS, DevInput, FalInput

__all__ = ["FieldError", "stored_input", "validate_fal_input"]


@dataclass(frozen=True, slots=True)
class FieldError:
    """One invalid field, named the way the fal input names it (``loc``)."""

    loc: tuple[str | int, ...]
    message: str
    kind: str


def stored_input(validated: FalInput) -> EditInput:
    """The edit a validated fal input asks for: the only place that maps fal's fields.

    ``image_url`` / ``image_urls`` are the references (none for text-to-image), ``sync_mode``
    is an inline output, ``safety_tolerance`` "1".."6" a level; fal [dev]'s
    ``resolution_mode`` is "auto" (the trained size nearest the input), "match_input" (the
    input's own size) or a ratio, and it has no ``safety_tolerance`` (the default level)."""
    data = validated.model_dump()
    aspect_ratio, match_input_size = data.get("aspect_ratio"), False
    if isinstance(validated, DevInput):
        mode = validated.resolution_mode
        match_input_size = mode == "match_input"
        aspect_ratio = None if mode in ("auto", "match_input") else mode
    if "image_urls" in data:
        references = tuple(data["image_urls"])
    else:
        references = (data["image_url"],) if "image_url" in data else ()
    return EditInput(
        prompt=data["prompt"],
        references=references,
        seed=data["seed"],
        guidance_scale=data["guidance_scale"],
        num_inference_steps=data.get("num_inference_steps"),
        num_images=data["num_images"],
        aspect_ratio=aspect_ratio,
        match_input_size=match_input_size,
        output_format=data["output_format"],
        inline_output=data["sync_mode"],
        safety_tolerance=int(data.get("safety_tolerance", DEFAULT_SAFETY_TOLERANCE)),
        enhance_prompt=data["enhance_prompt"],
        acceleration=data.get("acceleration"),
    )


def validate_fal_input(
    endpoint: str, fal_input: dict[str, Any], *, max_data_uri_bytes: int
) -> tuple[EditInput | None, list[FieldError]]:
    """``fal_input`` validated by the endpoint's input model: the edit and no errors, or
    ``None`` and the errors with the model's messages (they say what is allowed)."""
    model = ENDPOINTS[endpoint]
    try:
        validated = model.model_validate(
            fal_input, context={"max_data_uri_bytes": max_data_uri_bytes}
        )
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        return None, [FieldError(tuple(e["loc"]), str(e["msg"]), str(e["type"])) for e in errors]
    return stored_input(validated), []
