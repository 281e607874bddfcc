"""Input models of the fal endpoints (PROTOCOL.md §8) and the registry of served endpoints.

Every validation error carries a message that says what is allowed and what was sent, e.g.
``aspect_ratio must be a ratio W:H between 21:9 and 9:21 (e.g. 16:9, 4:3, 1:1, 9:16); got
'string'``. Each model names its rules once (``_rules``); a model-level wrap validator rewrites
pydantic's generic messages with them, so the messages are the same wherever a model is used.

Image sources get only cheap syntax checks here (``fetch.check_image_source``): the worker
fetches them. Pass the data-URI size cap as validation context::

    MaxInput.model_validate(body, context={"max_data_uri_bytes": n})

Adding an endpoint is one line in ``ENDPOINTS``. Several endpoints share a model: fal's pro and
max tiers differ only in the model behind them, and this server runs one model for all.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar, Literal, Self, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    ValidationError,
    ValidationInfo,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from kontext_server.domain.editing import DEFAULT_GUIDANCE_SCALE
from kontext_server.domain.errors import InputError
from kontext_server.net.fetch import check_image_source

__all__ = [
    "ACCELERATIONS",
    "ASPECT_RATIOS",
    "DEFAULT_MAX_DATA_URI_BYTES",
    "DEV_MAX_STEPS",
    "ENDPOINTS",
    "MAX_ENDPOINT",
    "MAX_IMAGE_URLS",
    "MULTI_ENDPOINT",
    "PROMPT_MAX_CHARS",
    "RESOLUTION_MODES",
    "SEED_LIMIT",
    "DevInput",
    "FalInput",
    "MaxInput",
    "MaxMultiInput",
    "NotBool",
    "TextToImageInput",
    "json_body_schema",
]

# The endpoints the neighbouring skins (BFL's, OpenAI's) map their edits onto: one image runs
# MAX_ENDPOINT, several MULTI_ENDPOINT.
MAX_ENDPOINT = "fal-ai/flux-pro/kontext/max"
MULTI_ENDPOINT = "fal-ai/flux-pro/kontext/max/multi"
PROMPT_MAX_CHARS = 4000  # T5 reads at most 512 tokens; this only bounds what we store
MAX_IMAGE_URLS = 10  # references for /multi; the worker also caps their total pixels
SEED_LIMIT = 2**63  # seeds are int64 in the worker
DEFAULT_MAX_DATA_URI_BYTES = 32 * 1024 * 1024  # decoded; when no context says otherwise
ASPECT_RATIOS = ("21:9", "16:9", "4:3", "3:2", "1:1", "2:3", "3:4", "9:16", "9:21")
ListedAspectRatio = Literal["21:9", "16:9", "4:3", "3:2", "1:1", "2:3", "3:4", "9:16", "9:21"]
# fal-ai/flux-kontext/dev: "auto" (the trained bucket nearest the input's aspect),
# "match_input" (the input's own size) or one of fal's ratios at ~1 MP.
ResolutionMode = Literal[
    "auto",
    "match_input",
    "21:9",
    "16:9",
    "4:3",
    "3:2",
    "5:4",
    "1:1",
    "4:5",
    "2:3",
    "3:4",
    "9:16",
    "9:21",
]
Acceleration = Literal["none", "regular", "high"]
RESOLUTION_MODES: tuple[str, ...] = get_args(ResolutionMode)
ACCELERATIONS: tuple[str, ...] = get_args(Acceleration)
DEV_MAX_STEPS = 50

# Error types raised by our own validators already carry a complete message: keep it.
_OWN_ERROR_TYPES = frozenset({"image_source", "aspect_ratio", "safety_tolerance", "prompt"})
_RATIO_PATTERN = re.compile(r"^([1-9][0-9]{0,3}):([1-9][0-9]{0,3})$")
_SAFETY_LEVELS = ("1", "2", "3", "4", "5", "6")

_ASPECT_RATIO_RULE = (
    "aspect_ratio must be a ratio W:H between 21:9 and 9:21 (e.g. 16:9, 4:3, 1:1, 9:16)"
)
_ASPECT_RATIO_ENUM_RULE = "aspect_ratio must be one of " + ", ".join(ASPECT_RATIOS)
_RESOLUTION_MODE_RULE = (
    "resolution_mode must be one of auto (the trained size nearest the input's aspect), "
    "match_input (the input's own size) or a ratio " + ", ".join(RESOLUTION_MODES[2:])
)
_SAFETY_RULE = (
    'safety_tolerance must be one of "1" to "6", as a string or an integer '
    "(1 strictest, 6 most permissive)"
)


def _shown(value: Any) -> str:
    """The offending input as the messages quote it, cut short (data URIs are long)."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _check_prompt(prompt: str) -> str:
    if not prompt.strip():
        raise PydanticCustomError("prompt", "prompt must not be empty: say what to edit")
    return _without_nul(prompt)


def _check_description(prompt: str) -> str:
    if not prompt.strip():
        raise PydanticCustomError(
            "prompt", "prompt must not be empty: describe the image to generate"
        )
    return _without_nul(prompt)


def _without_nul(prompt: str) -> str:
    """JSON bodies are refused with NUL anywhere (``json_limits``); this covers prompts that
    come another way (OpenAI's multipart form). PostgreSQL cannot store NUL."""
    if "\x00" in prompt:
        raise PydanticCustomError("prompt", "prompt must not contain the NUL character (\\u0000)")
    return prompt


def _default_square(ratio: Any) -> Any:
    """A null aspect_ratio of text-to-image means its default, 1:1 (there is no input to
    follow)."""
    return "1:1" if ratio is None else ratio


def _check_image_source(url: str, info: ValidationInfo) -> str:
    context = info.context if isinstance(info.context, dict) else {}
    max_bytes = int(context.get("max_data_uri_bytes", DEFAULT_MAX_DATA_URI_BYTES))
    try:
        check_image_source(url, max_data_uri_bytes=max_bytes)
    except InputError as exc:
        raise PydanticCustomError("image_source", f"{info.field_name}: {exc}") from None
    return url


def _check_aspect_ratio(ratio: str | None) -> str | None:
    """A ``W:H`` between 21:9 and 9:21 (inclusive)."""
    if ratio is None:
        return None
    match = _RATIO_PATTERN.match(ratio.strip())
    if match is None or not 9 / 21 <= int(match[1]) / int(match[2]) <= 21 / 9:
        raise PydanticCustomError("aspect_ratio", f"{_ASPECT_RATIO_RULE}; got {_shown(ratio)}")
    return ratio.strip()


def _safety_level(value: Any) -> Any:
    """ "1".."6" or 1..6, kept as the string fal uses."""
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 6:
        return str(value)
    if isinstance(value, str) and value.strip() in _SAFETY_LEVELS:
        return value.strip()
    raise PydanticCustomError("safety_tolerance", f"{_SAFETY_RULE}; got {_shown(value)}")


def _not_bool(value: Any) -> Any:
    """JSON ``true``/``false`` is not a number: pydantic's lax mode would read ``true`` as 1
    (strings such as ``"3"`` stay accepted, as documented)."""
    if isinstance(value, bool):
        raise PydanticCustomError("number_type", "a boolean is not a number")
    return value


NotBool = BeforeValidator(_not_bool)
Seed = Annotated[int | None, Field(ge=0, lt=SEED_LIMIT), NotBool]
ImageCount = Annotated[int, Field(ge=1, le=4), NotBool]
Guidance = Annotated[float, Field(ge=1, le=20, allow_inf_nan=False), NotBool]
Prompt = Annotated[str, Field(max_length=PROMPT_MAX_CHARS), AfterValidator(_check_prompt)]
Description = Annotated[str, Field(max_length=PROMPT_MAX_CHARS), AfterValidator(_check_description)]
# "format: uri" tells OpenAPI readers (and the schema fuzzers) what kind of string it is.
ImageSource = Annotated[
    str, AfterValidator(_check_image_source), Field(json_schema_extra={"format": "uri"})
]
SafetyTolerance = Annotated[Literal["1", "2", "3", "4", "5", "6"], BeforeValidator(_safety_level)]


class FalInput(BaseModel):
    """Fields shared by the Kontext endpoints. Unknown fields are ignored, as fal does.

    ``sync_mode`` is passed on to the worker (it then answers ``data:`` URIs and stores no
    file). ``enhance_prompt`` is accepted and passed on; no prompt upsampler is configured, so
    the worker logs that the prompt was used as given."""

    model_config = ConfigDict(extra="ignore")

    _rules: ClassVar[dict[str, str]] = {
        "prompt": (
            f"prompt must be a non-empty string of at most {PROMPT_MAX_CHARS} characters "
            "(the edit instruction)"
        ),
        "seed": f"seed must be an integer with 0 <= seed < 2**63 ({SEED_LIMIT}), or null",
        "guidance_scale": "guidance_scale must be a number from 1 to 20",
        "sync_mode": "sync_mode must be true or false",
        "num_images": "num_images must be an integer from 1 to 4",
        "safety_tolerance": _SAFETY_RULE,
        "output_format": 'output_format must be "jpeg" or "png"',
        "aspect_ratio": _ASPECT_RATIO_RULE,
        "enhance_prompt": "enhance_prompt must be true or false",
        "image_url": (
            "image_url must be an http(s) URL or a data: URI of a jpeg, png, webp, gif or "
            "avif image"
        ),
        "image_urls": (
            f"image_urls must be a list of 1 to {MAX_IMAGE_URLS} http(s) URLs or data: URIs "
            "of images"
        ),
    }
    _body_rule: ClassVar[str] = "the request body must be a JSON object"

    @model_validator(mode="wrap")
    @classmethod
    def _explain_errors(cls, data: Any, handler: ModelWrapValidatorHandler[Self]) -> Self:
        """Re-raise pydantic's errors with messages that say what each field allows."""
        try:
            return handler(data)
        except ValidationError as exc:
            details = [cls._explained(error) for error in exc.errors()]
            raise ValidationError.from_exception_data(exc.title, details) from None

    @classmethod
    def _explained(cls, error: Any) -> InitErrorDetails:
        loc = tuple(error["loc"])
        kind = str(error["type"])
        field = str(loc[0]) if loc else ""
        if kind in _OWN_ERROR_TYPES:
            message = str(error["msg"])
        elif not loc:
            message = f"{cls._body_rule}; got {_shown(error['input'])}"
        elif kind == "missing":
            message = f"{field} is required: {cls._rules.get(field, field)}"
        else:
            message = f"{cls._rules.get(field, error['msg'])}; got {_shown(error['input'])}"
        return {"type": PydanticCustomError(kind, message), "loc": loc, "input": error["input"]}


class MaxInput(FalInput):
    """``fal-ai/flux-pro/kontext/max``: edit one image (stored as ``Job.input``)."""

    _body_rule: ClassVar[str] = (
        "the request body must be a JSON object with at least prompt and image_url"
    )

    prompt: Prompt
    image_url: ImageSource
    seed: Seed = None
    guidance_scale: Guidance = DEFAULT_GUIDANCE_SCALE
    sync_mode: bool = False
    num_images: ImageCount = 1
    safety_tolerance: SafetyTolerance = "2"
    output_format: Literal["jpeg", "png"] = "jpeg"
    aspect_ratio: Annotated[str | None, AfterValidator(_check_aspect_ratio)] = None
    enhance_prompt: bool = False


class MaxMultiInput(FalInput):
    """``fal-ai/flux-pro/kontext/max/multi``: edit with several reference images."""

    _body_rule: ClassVar[str] = (
        "the request body must be a JSON object with at least prompt and image_urls"
    )

    prompt: Prompt
    image_urls: Annotated[list[ImageSource], Field(min_length=1, max_length=MAX_IMAGE_URLS)]
    seed: Seed = None
    guidance_scale: Guidance = DEFAULT_GUIDANCE_SCALE
    sync_mode: bool = False
    num_images: ImageCount = 1
    safety_tolerance: SafetyTolerance = "2"
    output_format: Literal["jpeg", "png"] = "jpeg"
    aspect_ratio: ListedAspectRatio | None = None
    enhance_prompt: bool = False

    _rules: ClassVar[dict[str, str]] = {
        **FalInput._rules,
        "aspect_ratio": _ASPECT_RATIO_ENUM_RULE,
    }


class TextToImageInput(FalInput):
    """``fal-ai/flux-pro/kontext/max/text-to-image`` (and ``.../kontext/text-to-image``):
    generate from the prompt alone, at ~1 MP in ``aspect_ratio`` (default 1:1)."""

    _body_rule: ClassVar[str] = "the request body must be a JSON object with at least prompt"

    prompt: Description
    seed: Seed = None
    guidance_scale: Guidance = DEFAULT_GUIDANCE_SCALE
    sync_mode: bool = False
    num_images: ImageCount = 1
    safety_tolerance: SafetyTolerance = "2"
    output_format: Literal["jpeg", "png"] = "jpeg"
    aspect_ratio: Annotated[ListedAspectRatio, BeforeValidator(_default_square)] = "1:1"
    enhance_prompt: bool = False

    _rules: ClassVar[dict[str, str]] = {
        **FalInput._rules,
        "prompt": (
            f"prompt must be a non-empty string of at most {PROMPT_MAX_CHARS} characters "
            "(the description of the image)"
        ),
        "aspect_ratio": _ASPECT_RATIO_ENUM_RULE + " (default 1:1)",
    }


class DevInput(FalInput):
    """``fal-ai/flux-kontext/dev``: edit one image with the open [dev] model's own knobs.

    ``resolution_mode`` picks the output size; ``acceleration`` sets the worker's step cache
    for this request (docs/models.md#speed-presets); ``enable_safety_checker`` is accepted and
    not used (content safety follows the default ``safety_tolerance`` and the server's
    settings)."""

    _body_rule: ClassVar[str] = (
        "the request body must be a JSON object with at least prompt and image_url"
    )

    prompt: Prompt
    image_url: ImageSource
    num_inference_steps: Annotated[int, Field(ge=1, le=DEV_MAX_STEPS), NotBool] = 28
    seed: Seed = None
    guidance_scale: Guidance = 2.5
    sync_mode: bool = False
    num_images: ImageCount = 1
    enable_safety_checker: bool = True
    output_format: Literal["jpeg", "png"] = "jpeg"
    enhance_prompt: bool = False
    resolution_mode: ResolutionMode = "match_input"
    acceleration: Acceleration = "none"

    _rules: ClassVar[dict[str, str]] = {
        **FalInput._rules,
        "num_inference_steps": (
            f"num_inference_steps must be an integer from 1 to {DEV_MAX_STEPS}"
        ),
        "enable_safety_checker": "enable_safety_checker must be true or false",
        "resolution_mode": _RESOLUTION_MODE_RULE,
        "acceleration": "acceleration must be one of " + ", ".join(ACCELERATIONS),
    }


# The endpoints this server serves: endpoint id -> input model. One line per endpoint.
ENDPOINTS: dict[str, type[FalInput]] = {
    MAX_ENDPOINT: MaxInput,
    MULTI_ENDPOINT: MaxMultiInput,
    "fal-ai/flux-pro/kontext": MaxInput,
    "fal-ai/flux-pro/kontext/multi": MaxMultiInput,
    "fal-ai/flux-pro/kontext/max/text-to-image": TextToImageInput,
    "fal-ai/flux-pro/kontext/text-to-image": TextToImageInput,
    "fal-ai/flux-kontext/dev": DevInput,
}


def json_body_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The OpenAPI request body of a route that reads its JSON itself (within the limits of
    ``json_limits``) instead of declaring a body parameter."""
    content = {"application/json": {"schema": model.model_json_schema()}}
    return {"requestBody": {"required": True, "content": content}}
