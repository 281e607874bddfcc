"""Output sizes follow BFL's bucket rule; multi-reference sizes stay under the budget."""

from __future__ import annotations

import pytest

from kontext_server.domain.errors import InputError
from kontext_server.domain.sizing import (
    PREFERRED_KONTEXT_RESOLUTIONS,
    nearest_bucket,
    output_size,
    parse_aspect_ratio,
    reference_offsets,
    reference_sizes,
    scale_to_area,
)


def test_buckets_equal_diffusers_list() -> None:
    from diffusers.pipelines.flux.pipeline_flux_kontext import (
        PREFERRED_KONTEXT_RESOLUTIONS as DIFFUSERS_BUCKETS,
    )

    assert list(PREFERRED_KONTEXT_RESOLUTIONS) == list(DIFFUSERS_BUCKETS)


@pytest.mark.parametrize(
    ("input_size", "expected"),
    [
        ((1024, 1024), (1024, 1024)),
        ((64, 64), (1024, 1024)),
        ((4000, 3000), (1184, 880)),  # 4:3 photo
        ((3000, 4000), (880, 1184)),
        ((1920, 1080), (1392, 752)),  # 16:9
        ((1080, 1920), (752, 1392)),
        ((3000, 1000), (1568, 672)),  # wider than any bucket -> widest
        ((100, 1000), (672, 1568)),
        ((1200, 800), (1248, 832)),  # 3:2
        ((123, 457), (672, 1568)),
    ],
)
def test_output_size_is_nearest_bucket_by_aspect(
    input_size: tuple[int, int], expected: tuple[int, int]
) -> None:
    assert output_size(*input_size) == expected


@pytest.mark.parametrize(("width", "height"), [(w, h) for w in (50, 333, 999) for h in (77, 640)])
def test_output_size_minimises_aspect_difference(width: int, height: int) -> None:
    bucket = output_size(width, height)
    best = min(abs(width / height - w / h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS)
    assert abs(width / height - bucket[0] / bucket[1]) == best


@pytest.mark.parametrize(
    ("aspect_ratio", "expected"),
    [
        ("1:1", (1024, 1024)),
        ("16:9", (1360, 768)),
        ("9:16", (768, 1360)),
        ("21:9", (1552, 656)),
        ("9:21", (656, 1552)),
        ("4:3", (1168, 880)),
        ("3:2", (1248, 832)),
    ],
)
def test_aspect_ratio_gives_that_ratio_at_one_megapixel(
    aspect_ratio: str, expected: tuple[int, int]
) -> None:
    width, height = output_size(640, 480, aspect_ratio)
    assert (width, height) == expected
    assert width % 16 == 0
    assert height % 16 == 0
    assert 0.85 * 1024 * 1024 <= width * height <= 1024 * 1024


@pytest.mark.parametrize("bad", ["22:9", "9:22", "3:1", "1:3", "0:1", "16/9", "a:b", "", "-1:2"])
def test_aspect_ratio_outside_range_is_rejected_with_allowed_range(bad: str) -> None:
    with pytest.raises(InputError, match="21:9 and 9:21"):
        parse_aspect_ratio(bad)


def test_parse_aspect_ratio_accepts_the_extremes() -> None:
    assert parse_aspect_ratio("21:9") == (21, 9)
    assert parse_aspect_ratio(" 9 : 21 ") == (9, 21)


def test_area_override_scales_bucket_down_in_multiples_of_16() -> None:
    assert output_size(4000, 3000, area_px=128 * 128) == (144, 96)
    assert scale_to_area(1024, 1024, 10**7) == (1024, 1024)  # never up


def test_two_references_fit_default_budget_at_their_own_buckets() -> None:
    sizes = reference_sizes([(4000, 3000), (500, 500)], budget_px=2 * 1024 * 1024)
    assert sizes == [(1184, 880), (1024, 1024)]


def test_three_references_are_scaled_under_budget_keeping_multiples_of_16() -> None:
    budget_px = 2 * 1024 * 1024
    sizes = reference_sizes([(4000, 3000), (500, 500), (1080, 1920)], budget_px=budget_px)
    assert sum(w * h for w, h in sizes) <= budget_px
    assert sum(w * h for w, h in sizes) > 0.9 * budget_px
    assert all(w % 16 == 0 and h % 16 == 0 for w, h in sizes)
    assert sizes[1][0] == sizes[1][1]  # the square stays square
    assert nearest_bucket(*sizes[0]) == (1184, 880)


def test_reference_offsets_tile_on_a_squarish_canvas() -> None:
    # Two landscape images: the second goes below (keeps the canvas squarer than 2x wide).
    assert reference_offsets([(74, 55), (74, 55)]) == [(0, 0), (55, 0)]
    # Two portrait images: the second goes right.
    assert reference_offsets([(55, 74), (55, 74)]) == [(0, 0), (0, 55)]
    # Three squares: a tie goes below (as ComfyUI), then right of the 1x2 column.
    assert reference_offsets([(8, 8), (8, 8), (8, 8)]) == [(0, 0), (8, 0), (0, 8)]
