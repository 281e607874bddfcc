"""Content safety policy: what ``safety_tolerance`` means, torch-free.

fal's ``safety_tolerance`` runs from ``"1"`` (strictest) to ``"6"`` (most permissive). Here
each level maps to an NSFW-score threshold: an image whose classifier score (the summed
probability of the NSFW labels, 0..1) is at or above the level's threshold is flagged.

    level      1     2     3     4     5     6
    default  0.20  0.35  0.50  0.65  0.80  0.95   (KONTEXT_SAFETY_THRESHOLDS)

Level 6 is only the hard floor: what no caller can opt out of. The prompt blocklist
(``KONTEXT_SAFETY_PROMPT_BLOCKLIST``) applies at levels up to
``KONTEXT_SAFETY_BLOCKLIST_MAX_LEVEL`` (default 2, the strict levels).

What happens when something is flagged (the worker does it, see ``worker/local_engine.py``):

* a blocked prompt or a flagged input image ends the request: failed with ``error_type``
  ``content_policy_violation`` (HTTP 422 from the result endpoint);
* a flagged output image is replaced by a black image of the same size and its entry of
  ``has_nsfw_concepts`` is ``true``.

With no classifier configured (``KONTEXT_SAFETY_MODEL`` unset) images are not screened and
``has_nsfw_concepts`` is always false; the prompt blocklist still applies.
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final, Protocol

from PIL import Image

from kontext_server.config import Settings
from kontext_server.domain.editing import EditResult, EncodedImage
from kontext_server.domain.errors import ConfigError, InputError
from kontext_server.worker.imaging import encode_image

__all__ = [
    "CONTENT_POLICY_ERROR_TYPE",
    "DEFAULT_BLOCKLIST_MAX_LEVEL",
    "DEFAULT_NSFW_LABELS",
    "DEFAULT_THRESHOLDS",
    "SAFETY_LEVELS",
    "ContentPolicyViolation",
    "ContentSafety",
    "ImageClassifier",
    "SafetyPolicy",
    "black_image_like",
    "policy_from_settings",
]

CONTENT_POLICY_ERROR_TYPE: Final = "content_policy_violation"  # fal's word
SAFETY_LEVELS: Final = (1, 2, 3, 4, 5, 6)
DEFAULT_THRESHOLDS: Final = (0.20, 0.35, 0.50, 0.65, 0.80, 0.95)
DEFAULT_BLOCKLIST_MAX_LEVEL: Final = 2
DEFAULT_SAFETY_LEVEL: Final = 2  # fal's default safety_tolerance
# Labels of common NSFW image classifiers (Falconsai "nsfw", GantMan-style "porn"/"hentai"/
# "sexy"); every other label counts as safe.
DEFAULT_NSFW_LABELS: Final = ("nsfw", "porn", "hentai", "sexy", "explicit")


class ContentPolicyViolation(InputError):
    """The prompt or an input image is refused by the content policy."""

    error_type = CONTENT_POLICY_ERROR_TYPE


class ImageClassifier(Protocol):
    """Scores images for NSFW content. ``worker.safety.TransformersNSFWClassifier`` is the
    real one; tests may pass hand-written fakes."""

    def nsfw_scores(self, images: Sequence[Image.Image]) -> list[float]:
        """One score per image, 0 (safe) to 1 (certainly NSFW)."""
        ...


def _word_pattern(term: str) -> re.Pattern[str]:
    # Whole words (or phrases), case-insensitive: "ass" must not block "class".
    words = r"\s+".join(re.escape(word) for word in term.split())
    return re.compile(rf"(?<!\w){words}(?!\w)", re.IGNORECASE)


@dataclass(frozen=True)
class SafetyPolicy:
    """The level table and the prompt blocklist. ``thresholds[i]`` is level ``i + 1``'s."""

    thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS
    prompt_blocklist: tuple[str, ...] = ()
    blocklist_max_level: int = DEFAULT_BLOCKLIST_MAX_LEVEL
    _patterns: tuple[tuple[str, re.Pattern[str]], ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if len(self.thresholds) != len(SAFETY_LEVELS):
            raise ConfigError(
                f"KONTEXT_SAFETY_THRESHOLDS needs {len(SAFETY_LEVELS)} numbers (levels 1 to 6), "
                f"got {len(self.thresholds)}"
            )
        if any(not 0.0 <= t <= 1.0 for t in self.thresholds) or list(self.thresholds) != sorted(
            self.thresholds
        ):
            raise ConfigError(
                "KONTEXT_SAFETY_THRESHOLDS must be six scores from 0 to 1 that never decrease "
                f"from level 1 to level 6; got {list(self.thresholds)}"
            )
        terms = [term.strip() for term in self.prompt_blocklist if term.strip()]
        object.__setattr__(self, "_patterns", tuple((t, _word_pattern(t)) for t in terms))

    def threshold(self, level: int) -> float:
        """The NSFW score at or above which an image is flagged at ``level`` (1..6)."""
        return self.thresholds[_checked_level(level) - 1]

    def is_flagged(self, score: float, level: int) -> bool:
        return score >= self.threshold(level)

    def blocked_term(self, prompt: str, level: int) -> str | None:
        """The first blocklist term found in ``prompt`` at a strict level, else None."""
        if _checked_level(level) > self.blocklist_max_level:
            return None
        return next((term for term, pattern in self._patterns if pattern.search(prompt)), None)


def policy_from_settings(settings: Settings) -> SafetyPolicy:
    """The policy the operator configured (``KONTEXT_SAFETY_*``); ConfigError if unusable."""
    return SafetyPolicy(
        thresholds=tuple(settings.safety_thresholds),
        prompt_blocklist=tuple(settings.safety_prompt_blocklist),
        blocklist_max_level=settings.safety_blocklist_max_level,
    )


def _checked_level(level: int) -> int:
    if level not in SAFETY_LEVELS:
        raise ValueError(f"safety level must be 1 to 6, got {level!r}")
    return level


def black_image_like(image: EncodedImage) -> EncodedImage:
    """A black image of the same size and format (what replaces a flagged output)."""
    black = Image.new("RGB", (image.width, image.height))
    return encode_image(black, "png" if image.content_type == "image/png" else "jpeg")


class ContentSafety:
    """The policy applied to one job's prompt, inputs and outputs.

    ``classifier`` None means no image screening (``has_nsfw_concepts`` all false); the prompt
    blocklist still applies.
    """

    def __init__(self, policy: SafetyPolicy, classifier: ImageClassifier | None) -> None:
        self.policy = policy
        self.classifier = classifier

    @property
    def screens_images(self) -> bool:
        return self.classifier is not None

    def check_prompt(self, prompt: str, level: int) -> None:
        """Raises ContentPolicyViolation when the prompt holds a blocked term at ``level``."""
        term = self.policy.blocked_term(prompt, level)
        if term is not None:
            raise ContentPolicyViolation(
                f"the prompt was refused by the content policy (blocked term {term!r} at "
                f"safety_tolerance {level}; levels up to {self.policy.blocklist_max_level} "
                "apply the prompt blocklist)"
            )

    def check_inputs(self, images: Sequence[Image.Image], level: int) -> None:
        """Raises ContentPolicyViolation when an input image scores at or above the level's
        threshold."""
        if self.classifier is None or not images:
            return
        scores = self.classifier.nsfw_scores(images)
        threshold = self.policy.threshold(level)
        for index, score in enumerate(scores):
            if score >= threshold:
                raise ContentPolicyViolation(
                    f"input image {index + 1} was refused by the content policy (NSFW score "
                    f"{score:.2f} >= {threshold:.2f}, the threshold of safety_tolerance {level})"
                )

    def screen_outputs(self, result: EditResult, level: int) -> tuple[EditResult, list[bool]]:
        """The result with flagged images replaced by black ones, and one flag per image."""
        if self.classifier is None or not result.images:
            return result, [False] * len(result.images)
        decoded = [_decode_own(image) for image in result.images]
        scores = self.classifier.nsfw_scores(decoded)
        flags = [self.policy.is_flagged(score, level) for score in scores]
        if not any(flags):
            return result, flags
        images = [
            black_image_like(image) if flagged else image
            for image, flagged in zip(result.images, flags, strict=True)
        ]
        return _with_images(result, images), flags


def _decode_own(image: EncodedImage) -> Image.Image:
    # Our own encoder's output: no untrusted-input caps needed.
    with Image.open(io.BytesIO(image.data)) as opened:
        return opened.convert("RGB")


def _with_images(result: EditResult, images: list[EncodedImage]) -> EditResult:
    return EditResult(
        images=images,
        seed=result.seed,
        timings=result.timings,
        random_weights=result.random_weights,
        steps=result.steps,
        gpu_memory_bytes=result.gpu_memory_bytes,
    )
