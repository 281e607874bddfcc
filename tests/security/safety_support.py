"""A tiny ViT NSFW classifier saved to disk whose verdict the test chooses, and a fake one."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

LABELS = {0: "normal", 1: "nsfw"}


def save_tiny_nsfw_classifier(folder: Path, nsfw_probability: float) -> Path:
    """Save a tiny random ``ViTForImageClassification`` (+ image processor) whose softmax gives
    the ``nsfw`` label exactly ``nsfw_probability`` for every image: the classifier head's
    weights are zero and its bias carries the log-odds."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessorPil

    config = ViTConfig(
        image_size=32,
        patch_size=16,
        num_channels=3,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=2,
        id2label=LABELS,
        label2id={label: i for i, label in LABELS.items()},
    )
    model = ViTForImageClassification(config).eval()
    with torch.no_grad():
        model.classifier.weight.zero_()
        log_odds = math.log(nsfw_probability / (1.0 - nsfw_probability))
        model.classifier.bias.copy_(torch.tensor([0.0, log_odds]))
    model.save_pretrained(folder)
    ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


class RedIsNSFW:
    """A hand-written classifier: the share of strongly red pixels is the NSFW score."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def nsfw_scores(self, images: Sequence[Image.Image]) -> list[float]:
        self.calls.append(len(images))
        return [_red_share(image) for image in images]


def _red_share(image: Image.Image) -> float:
    rgb = image.convert("RGB")
    pixels = list(rgb.getdata())
    red = sum(1 for r, g, b in pixels if r > 150 and g < 100 and b < 100)
    return red / len(pixels)
