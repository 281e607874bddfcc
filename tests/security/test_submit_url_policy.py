"""Image and webhook URLs that need no DNS to judge are refused at submit, with a 422 that
says why, and nothing is queued; the worker and the dispatcher check again when they fetch."""

from __future__ import annotations

import pytest
from http_support import LOOPBACK, MAX, AppFactory, edit_body
from starlette.testclient import TestClient

from kontext_server.store.sqlite import SQLiteJobStore

FORBIDDEN = [
    "http://127.0.0.1/x.png",
    "http://127.1/x.png",
    "http://2130706433/x.png",
    "http://0x7f000001/x.png",
    "http://[::1]/x.png",
    "http://[::ffff:127.0.0.1]/x.png",
    "http://localhost/x.png",
    "http://0.0.0.0/x.png",
    "http://10.1.2.3/x.png",
    "http://169.254.169.254/latest/meta-data",
    "http://[fd00:ec2::254]/x.png",
    "http://100.64.0.1/x.png",
    "http://[64:ff9b::a00:1]/x.png",
    "http://example.com:22/x.png",
    "http://[fe80::1%25lo]/x.png",  # link-local with a zone id
    "http://[fe80::1%25no-such-interface]/x.png",
]


@pytest.mark.parametrize("url", FORBIDDEN)
def test_a_forbidden_image_url_is_refused_at_submit(
    make_app: AppFactory, store: SQLiteJobStore, url: str
) -> None:
    with TestClient(make_app(), client=LOOPBACK) as client:
        response = client.post(f"/{MAX}", json=edit_body(image_url=url))
    assert response.status_code == 422
    [error] = response.json()["detail"]
    assert error["loc"] == ["body", "image_url"]
    assert "is not allowed" in error["msg"]
    assert store.queue_depth() == 0


@pytest.mark.parametrize("url", FORBIDDEN[:6])
def test_a_forbidden_webhook_url_is_refused_at_submit(
    make_app: AppFactory, store: SQLiteJobStore, url: str
) -> None:
    with TestClient(make_app(), client=LOOPBACK) as client:
        response = client.post(f"/{MAX}", params={"fal_webhook": url}, json=edit_body())
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["query", "fal_webhook"]
    assert store.queue_depth() == 0


def test_forbidden_urls_among_several_references_are_each_named(make_app: AppFactory) -> None:
    body = {
        "prompt": "p",
        "image_urls": ["https://example.com/a.png", "http://127.0.0.1/b.png", "http://10.0.0.1/"],
    }
    with TestClient(make_app(), client=LOOPBACK) as client:
        response = client.post(f"/{MAX}/multi", json=body)
    assert response.status_code == 422
    locs = [error["loc"] for error in response.json()["detail"]]
    assert locs == [["body", "image_urls", 1], ["body", "image_urls", 2]]


def test_names_pass_at_submit_and_are_checked_when_fetched(make_app: AppFactory) -> None:
    with TestClient(make_app(), client=LOOPBACK) as client:
        response = client.post(f"/{MAX}", json=edit_body(image_url="https://example.com/a.png"))
    assert response.status_code == 200


def test_this_servers_own_files_pass_at_submit(make_app: AppFactory) -> None:
    with TestClient(make_app(), base_url="http://127.0.0.1:8000", client=LOOPBACK) as client:
        own = "http://127.0.0.1:8000/files/uploads/2026112800/abc/cat.png"
        response = client.post(f"/{MAX}", json=edit_body(image_url=own))
    assert response.status_code == 200


def test_this_servers_own_files_by_localhost_pass_at_submit(make_app: AppFactory) -> None:
    with TestClient(make_app(), base_url="http://127.0.0.1:8000", client=LOOPBACK) as client:
        own = "http://localhost:8000/files/uploads/2026112800/abc/cat.png"
        response = client.post(f"/{MAX}", json=edit_body(image_url=own))
    assert response.status_code == 200


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/files/uploads/2026112800/abc/cat.png",
        "http://10.0.0.5:8000/files/x/1-0.png",
        "http://127.0.0.1:9999/files/x/1-0.png",  # our address, another port
    ],
)
def test_a_host_header_does_not_make_an_address_our_own(
    make_app: AppFactory, store: SQLiteJobStore, url: str
) -> None:
    """The client names the Host; the own-files exemption follows the socket the request
    came in on (here 127.0.0.1:8000), so a forged Host does not open an address."""
    forged_host = url.split("/")[2]
    with TestClient(make_app(), base_url="http://127.0.0.1:8000", client=LOOPBACK) as client:
        response = client.post(
            f"/{MAX}", json=edit_body(image_url=url), headers={"host": forged_host}
        )
    assert response.status_code == 422, response.text
    assert "is not allowed" in response.json()["detail"][0]["msg"]
    assert store.queue_depth() == 0


def test_an_allow_listed_private_host_passes(make_app: AppFactory) -> None:
    app = make_app(fetch_allow_hosts=["10.0.0.0/8"])
    with TestClient(app, client=LOOPBACK) as client:
        response = client.post(f"/{MAX}", json=edit_body(image_url="http://10.1.2.3/x.png"))
    assert response.status_code == 200
