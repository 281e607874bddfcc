"""The typed edit input (its record round trip, its checks, old rows read as before) and the
typed edit output."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest
from PIL import Image

from kontext_server.domain.editing import (
    DEFAULT_GUIDANCE_SCALE,
    EDIT_INPUT_VERSION,
    EditInput,
    EditOutput,
    EditRequest,
    OutputImage,
)
from kontext_server.store.inputs import decode_input, encode_input, upgrade_record

FULL = EditInput(
    prompt="make it blue",
    references=("https://example.com/a.png", "data:image/png;base64,AAAA"),
    seed=7,
    guidance_scale=4.5,
    num_inference_steps=20,
    num_images=2,
    aspect_ratio="16:9",
    output_format="png",
    inline_output=True,
    safety_tolerance=5,
    enhance_prompt=True,
    acceleration="high",
)


def test_record_round_trips_through_json() -> None:
    record = json.loads(json.dumps(FULL.to_record()))
    assert set(record) == {"v", *EditInput.__dataclass_fields__}  # every field is kept
    assert record["v"] == EDIT_INPUT_VERSION
    assert EditInput.from_record(record) == FULL
    own_size = replace(FULL, aspect_ratio=None, match_input_size=True)
    assert EditInput.from_record(json.loads(json.dumps(own_size.to_record()))) == own_size
    assert EditRequest.of(own_size, []).match_input_size is True


def test_defaults_live_in_one_place() -> None:
    edit = EditInput(prompt="p")
    assert edit.guidance_scale == DEFAULT_GUIDANCE_SCALE == 3.5
    assert (edit.references, edit.num_images, edit.safety_tolerance) == ((), 1, 2)
    assert EditInput.from_record({"v": EDIT_INPUT_VERSION, "prompt": "p"}) == edit


def test_references_become_a_tuple() -> None:
    edit = EditInput(prompt="p", references=["a", "b"])  # type: ignore[arg-type]
    assert edit.references == ("a", "b")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("safety_tolerance", 0, "safety_tolerance must be 1 to 6"),
        ("safety_tolerance", 7, "safety_tolerance must be 1 to 6"),
        ("output_format", "gif", "output_format must be jpeg or png"),
        ("acceleration", "max", "acceleration must be none, regular or high"),
    ],
)
def test_out_of_range_values_are_refused(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EditInput(prompt="p", **{field: value})  # type: ignore[arg-type]


def test_from_record_refuses_an_old_row() -> None:
    with pytest.raises(ValueError, match="not an edit input record"):
        EditInput.from_record({"prompt": "p", "image_url": "x"})


def test_edit_request_carries_every_engine_field() -> None:
    image = Image.new("RGB", (8, 8))
    request = EditRequest.of(FULL, [image])
    assert request.images == [image]
    assert (request.prompt, request.seed, request.guidance_scale) == ("make it blue", 7, 4.5)
    assert (request.num_images, request.aspect_ratio, request.output_format) == (2, "16:9", "png")
    assert (request.num_inference_steps, request.acceleration) == (20, "high")
    assert request.match_input_size is False


def test_stored_input_keeps_the_skin_data_beside_the_edit() -> None:
    record = encode_input(FULL, "bfl", {"webhook_secret": "s"})
    assert decode_input(json.loads(json.dumps(record))) == (FULL, "bfl", {"webhook_secret": "s"})
    assert decode_input(encode_input(FULL)) == (FULL, None, None)
    assert upgrade_record(record) is None  # new rows are left alone


# Rows written before the typed input: the fal endpoint input, validated then.
LEGACY_MAX = {
    "prompt": "add a hat",
    "image_url": "https://example.com/cat.png",
    "seed": 3,
    "guidance_scale": 3.5,
    "sync_mode": True,
    "num_images": 2,
    "safety_tolerance": "4",
    "output_format": "png",
    "aspect_ratio": "4:3",
    "enhance_prompt": False,
}


def test_an_old_max_row_reads_as_the_worker_read_it() -> None:
    edit, api, api_data = decode_input(LEGACY_MAX)
    assert edit == EditInput(
        prompt="add a hat",
        references=("https://example.com/cat.png",),
        seed=3,
        num_images=2,
        aspect_ratio="4:3",
        output_format="png",
        inline_output=True,
        safety_tolerance=4,
    )
    assert (api, api_data) == (None, None)


def test_an_old_multi_row_keeps_its_references_in_order() -> None:
    edit, _, _ = decode_input({"prompt": "p", "image_urls": ["u1", "u2", "u3"]})
    assert edit.references == ("u1", "u2", "u3")


def test_an_old_text_to_image_row_has_no_reference() -> None:
    edit, _, _ = decode_input({"prompt": "a fox", "aspect_ratio": "1:1"})
    assert (edit.references, edit.aspect_ratio) == ((), "1:1")


@pytest.mark.parametrize(
    ("mode", "aspect_ratio", "match_input_size"),
    [("match_input", None, True), ("auto", None, False), ("16:9", "16:9", False)],
)
def test_an_old_dev_row_maps_its_resolution_mode(
    mode: str, aspect_ratio: str | None, match_input_size: bool
) -> None:
    old = {
        "prompt": "p",
        "image_url": "u",
        "guidance_scale": 2.5,
        "num_inference_steps": 30,
        "resolution_mode": mode,
        "acceleration": "regular",
        "enable_safety_checker": True,
    }
    edit, _, _ = decode_input(old)
    assert (edit.aspect_ratio, edit.match_input_size) == (aspect_ratio, match_input_size)
    assert (edit.guidance_scale, edit.num_inference_steps, edit.acceleration) == (
        2.5,
        30,
        "regular",
    )


def test_an_old_bfl_row_names_its_skin() -> None:
    old = {**LEGACY_MAX, "bfl_api": {"webhook_secret": "shh"}}
    _, api, api_data = decode_input(old)
    assert (api, api_data) == ("bfl", {"webhook_secret": "shh"})


@pytest.mark.parametrize("raw", [None, "x", "9", 0])
def test_an_old_odd_safety_level_reads_as_the_default(raw: object) -> None:
    edit, _, _ = decode_input({"prompt": "p", "safety_tolerance": raw})
    assert edit.safety_tolerance == 2


def test_upgrade_rewrites_an_old_row_to_the_same_edit() -> None:
    old = {**LEGACY_MAX, "bfl_api": {"webhook_secret": None}}
    new = upgrade_record(old)
    assert new is not None and new["v"] == EDIT_INPUT_VERSION
    assert decode_input(new) == decode_input(old)


# --- the output -----------------------------------------------------------------------------

OUTPUT = EditOutput(
    images=(
        OutputImage(512, 384, "image/png", 1234, "0.png", file_key="jobs/a/1/0.png"),
        OutputImage(8, 8, "image/jpeg", 99, "j-1.jpeg", url="data:image/jpeg;base64,AAAA"),
    ),
    seed=42,
    prompt="make it blue",
    nsfw_flags=(False, True),
    timings={"inference": 1.5},
    random_weights=True,
)


def test_output_record_round_trips_and_keeps_the_endpoint_output_keys() -> None:
    record = json.loads(json.dumps(OUTPUT.to_record()))
    assert set(record) == {
        "images",
        "timings",
        "seed",
        "has_nsfw_concepts",
        "prompt",
        "random_weights",
    }
    assert record["has_nsfw_concepts"] == [False, True]
    assert record["images"][0]["file_key"] == "jobs/a/1/0.png"
    assert EditOutput.from_record(record) == OUTPUT


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"images": "not a list of images", "seed": 1, "prompt": "p"}, "must be a list"),
        ({"images": [], "prompt": "p"}, "not an edit output record"),
        ({"images": [{"width": 1}], "seed": 1, "prompt": "p"}, "not an edit output record"),
    ],
)
def test_a_record_that_is_not_an_output_says_so(record: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EditOutput.from_record(record)
