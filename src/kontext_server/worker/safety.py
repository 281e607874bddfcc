"""The NSFW image classifier: a transformers image-classification model from a local folder.

Any ``AutoModelForImageClassification`` folder with an image processor works (for example a
ViT NSFW detector saved with ``save_pretrained``). It is loaded with ``local_files_only``: the
classifier never downloads anything. The NSFW score of an image is the summed probability of
the labels named in ``KONTEXT_SAFETY_NSFW_LABELS`` (case-insensitive); what a score means per
``safety_tolerance`` lives in ``kontext_server.worker.safety_policy``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from kontext_server.config import Settings
from kontext_server.domain.errors import ConfigError
from kontext_server.worker.safety_policy import ContentSafety, policy_from_settings

__all__ = ["TransformersNSFWClassifier", "content_safety_from_settings"]

log = logging.getLogger(__name__)

NO_CLASSIFIER_MESSAGE = (
    "content safety: no image classifier configured (KONTEXT_SAFETY_MODEL is unset), so input "
    "and output images are NOT screened and has_nsfw_concepts is always false; the prompt "
    "blocklist still applies (see docs/security.md)"
)


class TransformersNSFWClassifier:
    """Scores images with a local transformers image-classification model."""

    def __init__(
        self, path: Path, *, nsfw_labels: Sequence[str], device: str | None = None
    ) -> None:
        import torch
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        if not (path / "config.json").is_file():
            raise ConfigError(
                f"KONTEXT_SAFETY_MODEL={path} is not a transformers model folder (no "
                "config.json); point it at a folder saved with save_pretrained"
            )
        self._torch = torch
        self._device = torch.device(device or "cpu")
        self._processor = AutoImageProcessor.from_pretrained(str(path), local_files_only=True)
        model = AutoModelForImageClassification.from_pretrained(str(path), local_files_only=True)
        self._model = model.to(self._device).eval()
        wanted = {label.strip().lower() for label in nsfw_labels}
        id2label: dict[int, str] = dict(self._model.config.id2label)
        self._nsfw_ids = sorted(i for i, label in id2label.items() if label.lower() in wanted)
        if not self._nsfw_ids:
            labels = ", ".join(id2label.values())
            raise ConfigError(
                f"the safety model at {path} has no NSFW label (its labels: {labels}); set "
                "KONTEXT_SAFETY_NSFW_LABELS to the ones that mean NSFW"
            )

    def nsfw_scores(self, images: Sequence[Image.Image]) -> list[float]:
        """One score per image: the summed probability of the NSFW labels (0..1)."""
        if not images:
            return []
        inputs = self._processor(
            images=[image.convert("RGB") for image in images], return_tensors="pt"
        )
        with self._torch.inference_mode():
            logits = self._model(**inputs.to(self._device)).logits
        probabilities = logits.float().softmax(dim=-1)[:, self._nsfw_ids].sum(dim=-1)
        return [float(p) for p in probabilities.cpu()]


def content_safety_from_settings(settings: Settings) -> ContentSafety:
    """The policy with the configured classifier, or without one (logged once, loudly)."""
    policy = policy_from_settings(settings)
    if settings.safety_model is None:
        log.warning(NO_CLASSIFIER_MESSAGE)
        return ContentSafety(policy, None)
    classifier = TransformersNSFWClassifier(
        settings.safety_model,
        nsfw_labels=settings.safety_nsfw_labels,
        device=settings.safety_device,
    )
    log.info("content safety: NSFW classifier loaded from %s", settings.safety_model)
    return ContentSafety(policy, classifier)
