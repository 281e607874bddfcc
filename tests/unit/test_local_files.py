"""``LocalFileStore`` and the backend-independent key helpers of ``files/base.py``."""

from __future__ import annotations

import os
import re
import stat
import threading
from pathlib import Path

import pytest

from kontext_server.files.base import (
    StoredFile,
    content_type_for_key,
    is_valid_file_key,
    new_file_key,
)
from kontext_server.files.local import LocalFileStore

JPEG_BYTES = b"\xff\xd8\xff\xe0" + b"x" * 1000


@pytest.fixture
def files(tmp_path: Path) -> LocalFileStore:
    return LocalFileStore(tmp_path / "files")


# --- keys ----------------------------------------------------------------------------------------


def test_new_file_key_includes_attempt_and_index_but_not_the_job_id() -> None:
    key = new_file_key("3f1c0c1e-job-id", attempt=2, index=1, extension="jpeg")
    token, name = key.split("/")
    assert name == "2-1.jpeg"
    assert "3f1c0c1e" not in key
    assert re.fullmatch(r"[A-Za-z0-9_-]{24}", token)
    assert is_valid_file_key(key)


def test_new_file_keys_are_never_the_same() -> None:
    keys = {new_file_key("job", 1, 0, "png") for _ in range(1000)}
    assert len(keys) == 1000


@pytest.mark.parametrize(
    ("attempt", "index", "extension"),
    [(0, 0, "png"), (1, -1, "png"), (1, 0, ".png"), (1, 0, "p/g"), (1, 0, ""), (1, 0, "PNG")],
)
def test_new_file_key_refuses_impossible_parts(attempt: int, index: int, extension: str) -> None:
    with pytest.raises(ValueError, match=r"attempt|extension"):
        new_file_key("job", attempt, index, extension)


@pytest.mark.parametrize(
    "key",
    ["abc/1-0.jpeg", "a", "A-b_c.d/e.f/g", "x" * 512],
)
def test_valid_keys(key: str) -> None:
    assert is_valid_file_key(key)


@pytest.mark.parametrize(
    "key",
    [
        "",
        "../etc/passwd",
        "a/../../b",
        "a/./b",
        "/etc/passwd",
        ".hidden",
        "a//b",
        "a/",
        "a\\b",
        "a b",
        "a%2e%2e/b",
        "ünï.png",
        "a\x00b",
        "a\nb",
        "x" * 513,
    ],
)
def test_odd_keys_are_refused(key: str) -> None:
    assert not is_valid_file_key(key)


@pytest.mark.parametrize(
    ("key", "content_type"),
    [
        ("t/1-0.jpeg", "image/jpeg"),
        ("t/1-0.JPG", "image/jpeg"),
        ("t/1-0.png", "image/png"),
        ("t/1-0.webp", "image/webp"),
        ("t/1-0.json", "application/json"),
        ("t/no-extension", "application/octet-stream"),
        ("t.png/noext", "application/octet-stream"),
    ],
)
def test_content_type_comes_from_the_extension(key: str, content_type: str) -> None:
    assert content_type_for_key(key) == content_type


# --- the store ------------------------------------------------------------------------------------


def test_put_then_read_gives_the_bytes_back(files: LocalFileStore) -> None:
    stored = files.put("tok/1-0.jpeg", JPEG_BYTES, "image/jpeg")
    assert stored == StoredFile(key="tok/1-0.jpeg", size=len(JPEG_BYTES), content_type="image/jpeg")
    assert files.read("tok/1-0.jpeg") == JPEG_BYTES
    assert files.path("tok/1-0.jpeg") == files.root / "tok" / "1-0.jpeg"


def current_umask() -> int:
    status = Path("/proc/self/status")
    if not status.exists():
        pytest.skip("reading the umask without changing it needs /proc")
    [line] = [line for line in status.read_text().splitlines() if line.startswith("Umask:")]
    return int(line.split()[1], 8)


def test_files_get_the_usual_permissions(files: LocalFileStore) -> None:
    """Not 0600 like most temporary files: a web server the operator runs may serve them."""
    files.put("tok/1-0.jpeg", JPEG_BYTES, "image/jpeg")
    mode = stat.S_IMODE(os.stat(files.root / "tok" / "1-0.jpeg").st_mode)
    assert mode == 0o644 & ~current_umask()


def test_put_leaves_no_temporary_files(files: LocalFileStore) -> None:
    files.put("tok/1-0.jpeg", JPEG_BYTES, "image/jpeg")
    files.put("tok/1-0.jpeg", b"replaced", "image/jpeg")
    assert sorted(p.name for p in (files.root / "tok").iterdir()) == ["1-0.jpeg"]
    assert files.read("tok/1-0.jpeg") == b"replaced"


def test_readers_never_see_a_partial_file(files: LocalFileStore) -> None:
    big_a, big_b = b"a" * 4_000_000, b"b" * 4_000_000
    files.put("tok/big.png", big_a, "image/png")
    seen: set[bytes] = set()
    stop = threading.Event()

    def read_repeatedly() -> None:
        while not stop.is_set():
            data = files.read("tok/big.png")
            assert data is not None
            seen.add(data[:1] + data[-1:] + str(len(data)).encode())

    reader = threading.Thread(target=read_repeatedly)
    reader.start()
    for _ in range(20):
        files.put("tok/big.png", big_b, "image/png")
        files.put("tok/big.png", big_a, "image/png")
    stop.set()
    reader.join()
    assert seen <= {b"aa4000000", b"bb4000000"}


@pytest.mark.parametrize("key", ["../escape.png", "/abs/x.png", "a/../../b.png", "a b.png", ""])
def test_put_refuses_unsafe_keys(files: LocalFileStore, tmp_path: Path, key: str) -> None:
    with pytest.raises(ValueError, match="not allowed"):
        files.put(key, b"x", "image/png")
    assert not (tmp_path / "escape.png").exists()


@pytest.mark.parametrize("key", ["../escape.png", "/etc/passwd", "a/../../b", ".x"])
def test_read_and_path_of_unsafe_keys_are_none(files: LocalFileStore, key: str) -> None:
    assert files.read(key) is None
    assert files.path(key) is None


def test_missing_file_reads_as_none(files: LocalFileStore) -> None:
    assert files.read("tok/none.png") is None
    assert files.path("tok/none.png") is None
    files.put("tok/1-0.png", b"x", "image/png")
    assert files.path("tok") is None  # a folder is not a file


def test_symlink_out_of_the_root_is_not_followed(files: LocalFileStore, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("do not serve")
    (files.root / "link.png").symlink_to(secret)
    assert files.path("link.png") is None
    assert files.read("link.png") is None


def test_delete_removes_the_file_and_its_empty_folder(files: LocalFileStore) -> None:
    files.put("tok/1-0.png", b"x", "image/png")
    files.put("tok/1-1.png", b"y", "image/png")
    files.delete("tok/1-0.png")
    assert files.read("tok/1-0.png") is None
    assert files.read("tok/1-1.png") == b"y"
    files.delete("tok/1-1.png")
    assert not (files.root / "tok").exists()
    assert files.root.is_dir()
    files.delete("tok/1-1.png")  # already gone: fine


def test_delete_refuses_unsafe_keys(files: LocalFileStore) -> None:
    with pytest.raises(ValueError, match="not allowed"):
        files.delete("../x")


def test_url_is_under_files_of_the_base_url(files: LocalFileStore) -> None:
    assert files.url("tok/1-0.png", "http://127.0.0.1:8000") == (
        "http://127.0.0.1:8000/files/tok/1-0.png"
    )
    assert files.url("tok/1-0.png", "https://edit.example.com/api/") == (
        "https://edit.example.com/api/files/tok/1-0.png"
    )


def test_a_new_store_on_the_same_folder_sees_the_files(files: LocalFileStore) -> None:
    files.put("tok/1-0.png", b"x", "image/png")
    assert LocalFileStore(files.root).read("tok/1-0.png") == b"x"
