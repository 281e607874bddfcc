"""The submit-time URL checks' shortcuts keep their answers: a host name is never sent to
getaddrinfo (no IPv4 spelling has its letters), while every numeric spelling still is; a
parsed URL is reused, a bad one raises every time."""

from __future__ import annotations

import socket
from typing import Any

import httpx
import pytest

from kontext_server.net.fetch import SafeFetcher, URLNotAllowedError, parsed_url


@pytest.fixture
def asked_hosts(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The hosts getaddrinfo is asked about from now on (it still answers)."""
    asked: list[str] = []
    real = socket.getaddrinfo

    def recording(host: Any, *args: Any, **kwargs: Any) -> Any:
        asked.append(str(host))
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", recording)
    return asked


def _checker() -> SafeFetcher:
    return SafeFetcher(
        allow_hosts=[], allow_ports=[80, 443], timeout_s=5.0, max_bytes=1024, max_redirects=0
    )


@pytest.mark.parametrize(
    "url",
    [
        "https://v3.fal.media/files/rabbit/x.png",
        "https://images.example.com/a.jpg",
        "https://xn--bcher-kva.example/a.png",  # IDNA
    ],
)
def test_host_names_pass_the_precheck_without_asking_getaddrinfo(
    url: str, asked_hosts: list[str]
) -> None:
    _checker().precheck(url)

    assert asked_hosts == []


@pytest.mark.parametrize(
    "host", ["127.1", "2130706433", "0x7f000001", "0x7f.0.0.1", "10.0.0.1", "[::1]"]
)
def test_numeric_hosts_are_still_resolved_as_literals_and_refused(
    host: str, asked_hosts: list[str]
) -> None:
    with pytest.raises(URLNotAllowedError):
        _checker().precheck(f"http://{host}/x.png")

    assert asked_hosts, "a numeric host must be read by getaddrinfo (AI_NUMERICHOST)"


def test_a_hex_looking_name_is_still_read_by_getaddrinfo(asked_hosts: list[str]) -> None:
    # "cafe.bad" uses only hex letters and dots: it might be a spelling, so it is asked (and
    # turns out to be a name, which the fetch resolves later).
    _checker().precheck("https://cafe.bad/x.png")

    assert asked_hosts == ["cafe.bad"]


def test_parsed_urls_are_reused() -> None:
    url = "https://example.com/reused.png?n=1"

    assert parsed_url(url) is parsed_url(url)
    assert parsed_url(url) == httpx.URL(url)


def test_an_invalid_url_raises_every_time() -> None:
    for _ in range(2):
        with pytest.raises(httpx.InvalidURL):
            parsed_url("https://[not-ipv6]/x.png")
