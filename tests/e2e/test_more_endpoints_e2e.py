"""fal's text-to-image and [dev] endpoints through the official Python client (``fal_client``)
against a live kontext-server (tiny model, CPU), pointed at it as in
``test_fal_client_python.py``: the module globals ``QUEUE_URL_FORMAT`` / ``RUN_URL_FORMAT``."""

from __future__ import annotations

import io
from typing import Any

import fal_client
import fal_client.client
import httpx
import pytest
from e2e_support import ServerProcess, make_input_data_uri
from PIL import Image

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

TEXT_TO_IMAGE = "fal-ai/flux-pro/kontext/max/text-to-image"
DEV = "fal-ai/flux-kontext/dev"


@pytest.fixture
def fal(live_server: ServerProcess, monkeypatch: pytest.MonkeyPatch) -> fal_client.SyncClient:
    """A fal_client pointed at the live server over plain http; globals restored afterwards."""
    base = live_server.base_url
    monkeypatch.setattr(fal_client.client, "QUEUE_URL_FORMAT", f"{base}/")
    monkeypatch.setattr(fal_client.client, "RUN_URL_FORMAT", f"{base}/run/")
    monkeypatch.setattr(fal_client.client, "REST_URL", f"{base}/rest")
    monkeypatch.setattr(fal_client.client, "CDN_URL", f"{base}/cdn")
    return fal_client.SyncClient(key="e2e-any-key", default_timeout=60.0)


def fetched_image(entry: dict[str, Any], base_url: str) -> tuple[bytes, Image.Image]:
    """The file behind an output entry, checked against what the entry says."""
    assert entry["url"].startswith(f"{base_url}/files/"), entry["url"]
    response = httpx.get(entry["url"], timeout=10.0)
    assert response.status_code == 200, response.text
    image = Image.open(io.BytesIO(response.content))
    assert image.size == (entry["width"], entry["height"])
    return response.content, image


def log_messages(statuses: list[fal_client.Status]) -> list[str]:
    return [
        entry["message"] for status in statuses for entry in (getattr(status, "logs", None) or [])
    ]


def test_text_to_image_makes_an_image_of_the_aspect_ratio_and_repeats_it_by_seed(
    fal: fal_client.SyncClient, live_server: ServerProcess
) -> None:
    arguments = {"prompt": "A donut on a marble table.", "aspect_ratio": "16:9", "seed": 9}
    handle = fal.submit(TEXT_TO_IMAGE, arguments)

    assert handle.status_url.startswith(f"{live_server.base_url}/fal-ai/flux-pro/requests/")
    statuses = list(handle.iter_events(with_logs=True, interval=0.05))
    output = handle.get()
    again = fal.subscribe(TEXT_TO_IMAGE, arguments, interval=0.05)

    assert isinstance(statuses[-1], fal_client.Completed) and statuses[-1].error is None
    assert "text-to-image: no reference image" in log_messages(statuses)
    assert output["seed"] == 9
    assert output["prompt"] == "A donut on a marble table."
    [image] = output["images"]
    assert (image["width"], image["height"]) == (1360, 768)  # 16:9 at ~1 MP
    data, decoded = fetched_image(image, live_server.base_url)
    assert decoded.format == "JPEG"
    again_data, _ = fetched_image(again["images"][0], live_server.base_url)
    assert again_data == data


def test_text_to_image_defaults_to_a_square(fal: fal_client.SyncClient) -> None:
    output = fal.run("fal-ai/flux-pro/kontext/text-to-image", {"prompt": "A red kite."}, timeout=90)

    [image] = output["images"]
    assert (image["width"], image["height"]) == (1024, 1024)


def test_dev_matches_the_input_size_by_default_and_logs_the_acceleration(
    fal: fal_client.SyncClient, live_server: ServerProcess
) -> None:
    arguments = {
        "prompt": "Make it snow.",
        "image_url": make_input_data_uri(160, 96),
        "num_inference_steps": 2,
        "acceleration": "regular",
        "output_format": "png",
        "seed": 4,
    }
    handle = fal.submit(DEV, arguments)

    assert handle.status_url.startswith(f"{live_server.base_url}/fal-ai/flux-kontext/requests/")
    statuses = list(handle.iter_events(with_logs=True, interval=0.05))
    output = handle.get()
    by_id = fal.result(DEV, handle.request_id)  # rebuilds the URL from owner/alias

    messages = log_messages(statuses)
    assert "step 2/2" in messages
    assert any(m.startswith("acceleration 'regular'") for m in messages), messages
    [image] = output["images"]
    assert (image["width"], image["height"]) == (160, 96)
    assert image["content_type"] == "image/png"
    _, decoded = fetched_image(image, live_server.base_url)
    assert decoded.format == "PNG"
    assert by_id == output


def test_dev_resolution_mode_auto_and_ratios_set_the_output_size(
    fal: fal_client.SyncClient,
) -> None:
    image_url = make_input_data_uri(160, 96)
    common = {"prompt": "Make it snow.", "image_url": image_url, "num_inference_steps": 1}

    auto = fal.subscribe(DEV, {**common, "resolution_mode": "auto"}, interval=0.05)
    portrait = fal.subscribe(DEV, {**common, "resolution_mode": "4:5"}, interval=0.05)

    # auto: the trained bucket nearest 5:3; a ratio: that ratio at ~1 MP
    assert (auto["images"][0]["width"], auto["images"][0]["height"]) == (1328, 800)
    assert (portrait["images"][0]["width"], portrait["images"][0]["height"]) == (912, 1136)


def test_dev_refuses_a_bad_resolution_mode_with_a_clear_message(
    live_server: ServerProcess,
) -> None:
    body = {"prompt": "x", "image_url": make_input_data_uri(), "resolution_mode": "huge"}

    response = httpx.post(f"{live_server.base_url}/{DEV}", json=body, timeout=10.0)

    assert response.status_code == 422
    [error] = response.json()["detail"]
    assert error["loc"] == ["body", "resolution_mode"]
    assert error["msg"].startswith("resolution_mode must be one of auto")
