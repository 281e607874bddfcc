"""The neighbouring APIs against a live server with the tiny model: the official ``openai``
SDK's ``images.edit`` and a BFL-style submit-and-poll with httpx (PROTOCOL.md §11)."""

from __future__ import annotations

import base64
import io
import time

import httpx
import pytest
from e2e_support import ServerProcess
from openai import BadRequestError, OpenAI
from PIL import Image

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

PROMPT = "Put a donut next to the flour."


def png_bytes(input_image_uri: str) -> bytes:
    return base64.b64decode(input_image_uri.partition(",")[2])


def openai_client(server: ServerProcess) -> OpenAI:
    # Authentication is off on loopback with no keys; the SDK still sends a Bearer key.
    return OpenAI(base_url=f"{server.base_url}/v1", api_key="e2e-any-key", max_retries=0)


def test_openai_sdk_edits_one_image_and_answers_base64(
    live_server: ServerProcess, input_image_uri: str
) -> None:
    client = openai_client(live_server)

    answer = client.images.edit(
        model="gpt-image-1",
        image=("input.png", png_bytes(input_image_uri), "image/png"),
        prompt=PROMPT,
        response_format="b64_json",
    )

    assert answer.created > 0 and answer.data is not None and len(answer.data) == 1
    b64 = answer.data[0].b64_json
    assert b64 is not None
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert image.format == "PNG" and image.width > 0
    assert answer.size == f"{image.width}x{image.height}"


def test_openai_sdk_edits_several_images_and_answers_urls(
    live_server: ServerProcess, input_image_uri: str
) -> None:
    client = openai_client(live_server)
    image = png_bytes(input_image_uri)

    answer = client.images.edit(
        image=[("a.png", image, "image/png"), ("b.png", image, "image/png")],
        prompt=PROMPT,
        n=2,
        size="1024x1024",
        response_format="url",
        output_format="jpeg",
    )

    assert answer.data is not None and len(answer.data) == 2
    for entry in answer.data:
        assert entry.url is not None and entry.url.startswith(f"{live_server.base_url}/files/")
        downloaded = httpx.get(entry.url)
        assert downloaded.headers["content-type"] == "image/jpeg"
        result = Image.open(io.BytesIO(downloaded.content))
        assert result.width == result.height  # size 1024x1024 asks for a square


def test_openai_sdk_raises_its_own_error_for_an_invalid_request(
    live_server: ServerProcess, input_image_uri: str
) -> None:
    client = openai_client(live_server)

    with pytest.raises(BadRequestError) as raised:
        client.images.edit(
            image=("input.png", png_bytes(input_image_uri), "image/png"),
            prompt=PROMPT,
            output_format="webp",
        )

    assert raised.value.status_code == 400
    assert raised.value.param == "output_format"


def test_bfl_style_submit_and_poll_completes(
    live_server: ServerProcess, input_image_uri: str
) -> None:
    headers = {"x-key": "e2e-any-key"}
    body = {
        "prompt": PROMPT,
        "input_image": input_image_uri.partition(",")[2],  # BFL takes raw base64
        "seed": 7,
        "output_format": "png",
    }
    submitted = httpx.post(
        f"{live_server.base_url}/v1/flux-kontext-max", json=body, headers=headers
    )
    assert submitted.status_code == 200, submitted.text
    polling_url = submitted.json()["polling_url"]

    deadline = time.monotonic() + 90
    while True:
        polled = httpx.get(polling_url, headers=headers).json()
        if polled["status"] != "Pending" or time.monotonic() > deadline:
            break
        time.sleep(0.2)

    assert polled["status"] == "Ready", polled
    assert (polled["result"]["seed"], polled["result"]["prompt"]) == (7, PROMPT)
    sample = httpx.get(polled["result"]["sample"])
    assert Image.open(io.BytesIO(sample.content)).format == "PNG"
