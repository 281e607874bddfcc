"""``S3FileStore`` against a real S3-compatible server (moto's server mode) over HTTP."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from PIL import Image
from pydantic import SecretStr

from kontext_server.config import Settings
from kontext_server.domain.editing import EditInput, EditRequest, EditResult, EncodedImage
from kontext_server.domain.errors import ConfigError
from kontext_server.domain.jobs import JobStatus, NewJob
from kontext_server.files import open_file_store
from kontext_server.files.s3 import S3FileStore, S3Location, make_s3_client, parse_s3_url
from kontext_server.http.fal.results import render_output
from kontext_server.net.fetch import SafeFetcher
from kontext_server.store.sqlite import SQLiteJobStore
from kontext_server.worker.runner import JobRunner
from s3_fixtures import S3Server

PNG_BYTES = b"\x89PNG\r\n\x1a\n not really a png, S3 does not care"
KEY = "AbCdEfGhIjKlMnOpQrStUvWx/1-0.png"


def open_s3(settings: Settings, url: str) -> S3FileStore:
    store = open_file_store(url, settings)
    assert isinstance(store, S3FileStore)
    return store


@pytest.fixture
def s3_settings(s3_server: S3Server, tmp_path: Path) -> Settings:
    return s3_server.settings(tmp_path)


@pytest.fixture
def files(s3_settings: Settings, s3_bucket: str) -> S3FileStore:
    return open_s3(s3_settings, f"s3://{s3_bucket}/outputs/v1")


def object_keys(s3_server: S3Server, bucket: str) -> list[str]:
    listing = s3_server.client().list_objects_v2(Bucket=bucket)
    return sorted(item["Key"] for item in listing.get("Contents", []))


# --- put / read / delete ------------------------------------------------------------------------
def test_put_then_read_returns_the_bytes_stored_under_the_url_prefix(
    files: S3FileStore, s3_server: S3Server, s3_bucket: str
) -> None:
    stored = files.put(KEY, PNG_BYTES, "image/png")
    assert (stored.key, stored.size, stored.content_type) == (KEY, len(PNG_BYTES), "image/png")
    assert files.read(KEY) == PNG_BYTES
    assert object_keys(s3_server, s3_bucket) == [f"outputs/v1/{KEY}"]


def test_delete_removes_the_object_and_deleting_again_is_harmless(
    files: S3FileStore, s3_server: S3Server, s3_bucket: str
) -> None:
    files.put(KEY, PNG_BYTES, "image/png")
    files.delete(KEY)
    assert files.read(KEY) is None
    assert object_keys(s3_server, s3_bucket) == []
    files.delete(KEY)


def test_read_of_a_missing_or_invalid_key_is_none(files: S3FileStore) -> None:
    assert files.read("NoSuchKeyAtAll/1-0.png") is None
    assert files.read("../escape/1-0.png") is None


@pytest.mark.parametrize("key", ["../x.png", "/abs/x.png", ".hidden/x.png", "a//b.png"])
def test_keys_that_are_not_safe_are_refused(files: S3FileStore, key: str) -> None:
    with pytest.raises(ValueError, match="is not allowed"):
        files.put(key, PNG_BYTES, "image/png")
    with pytest.raises(ValueError, match="is not allowed"):
        files.delete(key)


def test_a_bucket_without_prefix_stores_keys_as_they_are(
    s3_settings: Settings, s3_server: S3Server, s3_bucket: str
) -> None:
    open_s3(s3_settings, f"s3://{s3_bucket}").put(KEY, PNG_BYTES, "image/png")
    assert object_keys(s3_server, s3_bucket) == [KEY]


def test_an_upload_that_fails_raises_an_os_error_naming_the_object(
    files: S3FileStore, s3_server: S3Server, s3_bucket: str
) -> None:
    s3_server.client().delete_bucket(Bucket=s3_bucket)
    with pytest.raises(OSError, match=rf"S3 upload of s3://{s3_bucket}/outputs/v1/{KEY} failed"):
        files.put(KEY, PNG_BYTES, "image/png")


def test_puts_from_many_threads_at_once_all_land(files: S3FileStore) -> None:
    keys = [f"Thread{n:02d}AbCdEfGhIjKlMnOp/1-0.png" for n in range(16)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda key: files.put(key, key.encode(), "image/png"), keys))
    assert [files.read(key) for key in keys] == [key.encode() for key in keys]


# --- presigned links ---------------------------------------------------------------------------
def test_presigned_link_downloads_the_file_with_its_content_type(files: S3FileStore) -> None:
    files.put(KEY, PNG_BYTES, "image/png")
    response = httpx.get(files.url(KEY, "http://ignored.example"))
    assert response.status_code == 200
    assert response.content == PNG_BYTES
    assert response.headers["content-type"] == "image/png"
    assert "immutable" in response.headers["cache-control"]


def test_presigned_link_carries_the_configured_expiry(
    s3_server: S3Server, s3_bucket: str, tmp_path: Path
) -> None:
    settings = s3_server.settings(tmp_path, s3_presign_expiry_s=3600)
    url = open_s3(settings, f"s3://{s3_bucket}/p").url(KEY, "")
    query = parse_qs(urlsplit(url).query)
    assert query["X-Amz-Expires"] == ["3600"]
    assert query["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"]  # signature v4


def test_path_style_puts_the_bucket_in_the_path(tmp_path: Path) -> None:
    url = offline_store(tmp_path, path_style=True).url(KEY, "")
    parts = urlsplit(url)
    assert parts.netloc == "objects.example:9000"
    assert parts.path == f"/bucket-1/out/{KEY}"


def test_without_path_style_the_bucket_is_in_the_host_name(tmp_path: Path) -> None:
    url = offline_store(tmp_path, path_style=False).url(KEY, "")
    parts = urlsplit(url)
    assert parts.netloc == "bucket-1.objects.example:9000"
    assert parts.path == f"/out/{KEY}"


def offline_store(tmp_path: Path, *, path_style: bool) -> S3FileStore:
    """A store whose client is never used for a request (signing is local computation)."""
    settings = Settings(
        data_dir=tmp_path,
        s3_endpoint_url="http://objects.example:9000",
        s3_access_key_id="id",
        s3_secret_access_key=SecretStr("secret"),
        s3_path_style=path_style,
    )
    return S3FileStore(make_s3_client(settings), S3Location("bucket-1", "out"), presign_expiry_s=60)


# --- configuration errors ----------------------------------------------------------------------
def test_a_missing_bucket_is_a_config_error_saying_what_to_fix(s3_settings: Settings) -> None:
    with pytest.raises(ConfigError, match=r"bucket 'no-such-bucket' does not exist.*create it"):
        open_file_store("s3://no-such-bucket/outputs", s3_settings)


def test_an_unreachable_endpoint_is_a_config_error_naming_it(
    tmp_path: Path, unused_port: int
) -> None:
    endpoint = f"http://127.0.0.1:{unused_port}"
    settings = S3Server(endpoint).settings(tmp_path)
    with pytest.raises(ConfigError, match=rf"cannot reach the S3 endpoint {endpoint}"):
        open_file_store("s3://some-bucket", settings)


@pytest.fixture
def unused_port() -> Iterator[int]:
    import socket

    with socket.socket() as sock:  # bound, never listening: connections are refused
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("s3://Bad_Bucket/x", "bucket name 'Bad_Bucket'"),
        ("s3://ab", "bucket name 'ab'"),
        ("s3://id:secret@bucket/x", "is not an S3 URL"),
        ("s3://bucket/x?region=eu", "is not an S3 URL"),
        ("s3://bucket/../up", "prefix '../up'"),
    ],
)
def test_unusable_urls_are_config_errors(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("?", r"\?")):
        parse_s3_url(url)


def test_url_parts_become_bucket_and_prefix() -> None:
    assert parse_s3_url("s3://my.bucket-1/a/b/") == S3Location("my.bucket-1", "a/b")
    assert parse_s3_url("s3://my-bucket") == S3Location("my-bucket", "")


def test_access_key_without_secret_is_a_config_error(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, s3_access_key_id="id")
    with pytest.raises(ConfigError, match="without KONTEXT_S3_SECRET_ACCESS_KEY"):
        make_s3_client(settings)


@pytest.mark.parametrize("expiry_s", [0, 7 * 24 * 3600 + 1])
def test_presign_expiry_beyond_what_sigv4_allows_is_a_config_error(
    tmp_path: Path, expiry_s: int
) -> None:
    settings = Settings(
        data_dir=tmp_path, s3_access_key_id="id", s3_secret_access_key=SecretStr("s")
    )
    with pytest.raises(ConfigError, match="s3_presign_expiry_s"):
        S3FileStore(make_s3_client(settings), S3Location("b-1", ""), presign_expiry_s=expiry_s)


# --- a worker publishing to S3, an API process handing out the link -------------------------------
class SolidImageEngine:
    """An ``EditPipeline`` that returns one solid PNG of 40x30 per requested image."""

    random_weights = True
    default_steps = 1

    def edit(
        self,
        request: EditRequest,
        *,
        on_step: Callable[[int, int], None] | None = None,
        should_cancel: Callable[[], bool] | None = None,
    ) -> EditResult:
        buffer = io.BytesIO()
        Image.new("RGB", (40, 30), (0, 90, 200)).save(buffer, format="PNG")
        image = EncodedImage(buffer.getvalue(), 40, 30, "image/png")
        return EditResult([image] * request.num_images, seed=3, random_weights=True)


def test_a_worker_result_stored_in_s3_renders_a_link_that_downloads_the_image(
    files: S3FileStore, s3_settings: Settings, tmp_path: Path
) -> None:
    store = SQLiteJobStore(tmp_path / "jobs.db")
    try:
        job_id = submit_edit(store)
        fetcher = SafeFetcher(allow_hosts=[], allow_ports=[443], timeout_s=5, max_bytes=1 << 20)
        runner = JobRunner(store, files, SolidImageEngine(), fetcher, worker_id="w1")
        try:
            assert runner.run_next() is True
        finally:
            runner.close()
        job = store.get(job_id)
        assert job is not None and job.status is JobStatus.SUCCEEDED, job and job.error
        output = render_output(job, "http://api.local", files)
    finally:
        store.close()
    url = output["images"][0]["url"]
    assert url.startswith(f"{s3_settings.s3_endpoint_url}/")
    response = httpx.get(url)
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(response.content)).size == (40, 30)


def submit_edit(store: SQLiteJobStore) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (255, 0, 0)).save(buffer, format="PNG")
    source = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    store.submit(
        NewJob(
            id="job-s3",
            endpoint="fal-ai/flux-pro/kontext/max",
            input=EditInput(prompt="blue", references=(source,), output_format="png"),
        )
    )
    return "job-s3"
