"""fal's storage endpoints (PROTOCOL.md §10): token + CDN upload, initiate + PUT, the size
cap, ownership of credentials, serving, expiry, and reading our own files back."""

from __future__ import annotations

import io
import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from http_support import LOOPBACK
from PIL import Image
from starlette.testclient import TestClient

from kontext_server.config import Settings
from kontext_server.core.auth import create_api_key
from kontext_server.core.uploads import (
    UploadCleanupLoop,
    UploadService,
    UploadSigner,
    expiry_folder,
    read_own_file,
    upload_file_name,
)
from kontext_server.domain.errors import ImageFetchError
from kontext_server.files.local import LocalFileStore
from kontext_server.http.fal.storage import lifecycle_ttl_s
from kontext_server.store.sqlite import SQLiteJobStore

REMOTE = ("203.0.113.9", 40000)
BASE = "http://testserver"


def png_bytes(width: int = 6, height: int = 4) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), "green").save(buffer, format="PNG")
    return buffer.getvalue()


def cdn_token(client: TestClient, **headers: str) -> dict[str, Any]:
    response = client.post(
        "/rest/storage/auth/token", params={"storage_type": "fal-cdn-v3"}, json={}, headers=headers
    )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def cdn_upload(
    client: TestClient, token: str, data: bytes, name: str = "photo.png", **headers: str
) -> Any:
    return client.post(
        "/cdn/files/upload",
        content=data,
        headers={
            "Authorization": f"Bearer {token}",
            "Content-Type": "image/png",
            "X-Fal-File-Name": name,
            **headers,
        },
    )


def key_of(url: str) -> str:
    return url.split("/files/", 1)[1]


# --- token + CDN upload ------------------------------------------------------------------------


def test_token_answer_has_fal_fields_and_an_aware_expiry(client: TestClient) -> None:
    body = cdn_token(client)

    assert body["token_type"] == "Bearer"
    assert body["base_url"] == f"{BASE}/cdn"
    expires_at = datetime.fromisoformat(body["expires_at"])
    assert expires_at.tzinfo is not None, "fal_client compares it with an aware datetime"
    assert 3500 < (expires_at - datetime.now(UTC)).total_seconds() <= 3600


def test_cdn_upload_stores_the_bytes_and_serves_them_at_the_access_url(
    client: TestClient,
) -> None:
    data = png_bytes()
    token = cdn_token(client)["token"]

    response = cdn_upload(client, token, data, name="../My Photo.PNG")

    assert response.status_code == 200, response.text
    url = response.json()["access_url"]
    assert url.startswith(f"{BASE}/files/uploads/")
    assert url.endswith("/My-Photo.png")
    served = client.get(url)
    assert served.status_code == 200
    assert served.content == data
    assert served.headers["content-type"] == "image/png"


def test_two_uploads_of_the_same_name_get_different_unguessable_urls(client: TestClient) -> None:
    token = cdn_token(client)["token"]

    first = cdn_upload(client, token, b"one").json()["access_url"]
    second = cdn_upload(client, token, b"two").json()["access_url"]

    assert first != second
    assert len(key_of(first).split("/")[2]) == 24  # 144 random bits


def test_an_html_upload_is_stored_as_bin_and_never_served_as_a_page(client: TestClient) -> None:
    token = cdn_token(client)["token"]

    response = cdn_upload(
        client, token, b"<script>alert(1)</script>", name="x.html", **{"Content-Type": "text/html"}
    )

    url = response.json()["access_url"]
    assert url.endswith("/x.bin")
    assert client.get(url).headers["content-type"] == "application/octet-stream"


def test_cdn_upload_without_a_valid_token_is_refused_when_keys_exist(
    app: FastAPI, store: SQLiteJobStore
) -> None:
    create_api_key(store, "alice")
    with TestClient(app, client=LOOPBACK) as client:
        missing = client.post("/cdn/files/upload", content=b"x")
        forged = client.post(
            "/cdn/files/upload",
            content=b"x",
            headers={"Authorization": "Bearer eyJvIjpudWxsfQ.AAAA"},
        )

    assert missing.status_code == 401
    assert forged.status_code == 401
    assert "not issued by this server" in forged.json()["detail"]


def test_a_token_binds_the_key_that_asked_and_works_for_a_remote_uploader(
    app: FastAPI, store: SQLiteJobStore
) -> None:
    _, key = create_api_key(store, "alice")
    with TestClient(app, client=REMOTE) as remote:
        refused = remote.post("/rest/storage/auth/token", json={})
        token = cdn_token(remote, Authorization=f"Key {key}")["token"]
        uploaded = cdn_upload(remote, token, png_bytes())

    assert refused.status_code == 401
    assert uploaded.status_code == 200, uploaded.text


def test_an_expired_token_is_refused_with_a_message(tmp_path: Path) -> None:
    now = [1_000_000.0]
    signer = UploadSigner(b"0" * 32, clock=lambda: now[0])
    token, _ = signer.sign("upload token", {"o": "alice"}, ttl_s=60)

    assert signer.verify("upload token", token)["o"] == "alice"
    now[0] += 61
    with pytest.raises(Exception, match="Expired upload token"):
        signer.verify("upload token", token)


def test_a_token_is_not_an_upload_url_ticket() -> None:
    signer = UploadSigner(b"1" * 32)
    token, _ = signer.sign("upload token", {"o": None, "k": "uploads/x"}, ttl_s=60)

    with pytest.raises(Exception, match="not issued by this server"):
        signer.verify("upload URL", token)


def test_an_api_key_may_upload_to_the_cdn_route_directly(
    app: FastAPI, store: SQLiteJobStore
) -> None:
    _, key = create_api_key(store, "alice")
    with TestClient(app, client=REMOTE) as remote:
        response = remote.post(
            "/cdn/files/upload", content=b"hello", headers={"Authorization": f"Key {key}"}
        )

    assert response.status_code == 200, response.text


# --- initiate + PUT ----------------------------------------------------------------------------


def initiate(client: TestClient, **body: Any) -> dict[str, str]:
    response = client.post(
        "/rest/storage/upload/initiate",
        params={"storage_type": "fal-cdn-v3"},
        json={"content_type": "image/png", "file_name": "cat.png", **body},
    )
    assert response.status_code == 200, response.text
    answer: dict[str, str] = response.json()
    return answer


def test_initiate_then_put_serves_the_file_at_file_url(client: TestClient) -> None:
    data = png_bytes()
    answer = initiate(client)

    put = client.put(answer["upload_url"], content=data, headers={"Content-Type": "image/png"})

    assert put.status_code == 200, put.text
    assert answer["file_url"].endswith("/cat.png")
    assert client.get(answer["file_url"]).content == data


def test_a_tampered_upload_url_is_refused(client: TestClient) -> None:
    answer = initiate(client)
    payload, mac = answer["upload_url"].rsplit("/", 1)[1].split(".")
    forged = f"{BASE}/cdn/uploads/{payload}.{mac[::-1]}"

    response = client.put(forged, content=b"x")

    assert response.status_code == 401


def test_initiate_needs_an_api_key_when_keys_exist(app: FastAPI, store: SQLiteJobStore) -> None:
    create_api_key(store, "alice")
    with TestClient(app, client=LOOPBACK) as client:
        response = client.post("/rest/storage/upload/initiate", json={"file_name": "a.png"})

    assert response.status_code == 401


# --- limits and lifecycles ---------------------------------------------------------------------


@pytest.fixture
def small_limit_client(make_app: Any, settings: Settings) -> Any:
    small = settings.model_copy(update={"max_upload_bytes": 100})
    with TestClient(make_app(settings=small), client=LOOPBACK) as client:
        yield client


def test_an_upload_over_the_limit_is_413_naming_the_limit(small_limit_client: TestClient) -> None:
    token = cdn_token(small_limit_client)["token"]

    too_big = cdn_upload(small_limit_client, token, b"x" * 101)
    just_fits = cdn_upload(small_limit_client, token, b"x" * 100)

    assert too_big.status_code == 413
    assert "100 bytes" in too_big.json()["detail"]
    assert just_fits.status_code == 200


def test_a_put_over_the_limit_is_413_even_without_a_content_length(
    small_limit_client: TestClient,
) -> None:
    answer = initiate(small_limit_client)

    response = small_limit_client.put(answer["upload_url"], content=iter([b"x" * 60, b"x" * 60]))

    assert response.status_code == 413


def test_multipart_uploads_are_refused_with_the_limit(client: TestClient) -> None:
    response = client.post("/rest/storage/upload/initiate-multipart", json={})

    assert response.status_code == 413
    assert "at most" in response.json()["detail"]


def test_a_lifecycle_header_shortens_the_life_but_never_extends_it() -> None:
    header = json.dumps({"expiration_duration_seconds": 3600})

    assert lifecycle_ttl_s([header], retention_s=7200) == 3600
    assert lifecycle_ttl_s([None, header], retention_s=60) == 60
    assert lifecycle_ttl_s(["not json", None], retention_s=60) == 60


def test_an_upload_lands_in_the_folder_of_its_expiry_hour(client: TestClient) -> None:
    token = cdn_token(client)["token"]
    lifecycle = json.dumps({"expiration_duration_seconds": 7200})

    url = cdn_upload(client, token, b"x", **{"X-Fal-Object-Lifecycle": lifecycle}).json()[
        "access_url"
    ]

    folder = key_of(url).split("/")[1]
    assert folder in {expiry_folder(time.time() + 7200 + d) for d in (-5, 0, 5)}


def test_cleanup_deletes_only_folders_whose_hour_has_passed(tmp_path: Path) -> None:
    files = LocalFileStore(tmp_path / "files")
    now = [1_800_000_000.0]
    service = UploadService(
        files, UploadSigner(b"2" * 32), max_bytes=1000, retention_s=3600, clock=lambda: now[0]
    )
    old = service.new_key("a.png", "image/png", ttl_s=60)
    later = service.new_key("b.png", "image/png", ttl_s=3600)
    service.store(old, b"old")
    service.store(later, b"later")
    (tmp_path / "files" / "uploads" / "not-a-folder").mkdir()
    loop = UploadCleanupLoop(files, interval_s=60, clock=lambda: now[0])

    assert loop.run_once() == 0
    now[0] += 2 * 3600 - 60  # past the first folder's hour, not the second's
    assert loop.run_once() == 1

    assert files.read(old) is None
    assert files.read(later) == b"later"
    assert not (tmp_path / "files" / old).parent.exists()


def test_file_names_keep_only_safe_characters_and_extensions() -> None:
    assert upload_file_name("../../etc/passwd", "text/plain") == "passwd.txt"
    assert upload_file_name(None, "image/jpeg") == "upload.jpeg"
    assert upload_file_name("a.svg", "image/svg+xml") == "a.bin"
    assert upload_file_name("C:\\x\\Été photo.JPG", "") == "t-photo.jpg"


# --- reading our own files back (the worker's side) --------------------------------------------


def test_read_own_file_finds_an_uploaded_url_under_any_host_and_root_path(
    client: TestClient, files: LocalFileStore
) -> None:
    token = cdn_token(client)["token"]
    url = cdn_upload(client, token, b"bytes").json()["access_url"]
    key = key_of(url)

    assert read_own_file(url, files, max_bytes=100) == b"bytes"
    assert read_own_file(f"https://proxy.example/kontext/files/{key}", files, max_bytes=100)
    assert read_own_file("https://example.com/files/uploads/nope/x.png", files, max_bytes=9) is None
    assert read_own_file("data:image/png;base64,AAAA", files, max_bytes=100) is None
    with pytest.raises(ImageFetchError, match="at most 2"):
        read_own_file(url, files, max_bytes=2)
