"""``kontext-server keys create|list|revoke`` on a real SQLite store."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from kontext_server.cli import app
from kontext_server.core.auth import hash_api_key
from kontext_server.store.sqlite import SQLiteJobStore


def run_keys(data_dir: Path, *args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, ["keys", *args, "--data-dir", str(data_dir)])
    return result.exit_code, result.stdout, result.stderr


def test_create_prints_the_key_once_and_stores_only_its_hash(tmp_path: Path) -> None:
    code, out, err = run_keys(tmp_path, "create", "--name", "ci")

    assert code == 0
    key = out.strip()
    key_id, _, secret = key.partition(":")
    assert len(secret) >= 32
    assert "cannot be shown again" in err
    store = SQLiteJobStore(tmp_path / "jobs.db")
    try:
        api_key = store.find_api_key(hash_api_key(key))
        assert api_key is not None
        assert (api_key.id, api_key.name) == (key_id, "ci")
    finally:
        store.close()


def test_list_shows_ids_and_names_but_never_the_keys(tmp_path: Path) -> None:
    key = run_keys(tmp_path, "create", "--name", "ci")[1].strip()

    code, out, _ = run_keys(tmp_path, "list")

    assert code == 0
    assert key.partition(":")[0] in out
    assert "ci" in out
    assert "active" in out
    assert key.partition(":")[2] not in out


def test_revoke_turns_a_key_off(tmp_path: Path) -> None:
    key = run_keys(tmp_path, "create", "--name", "ci")[1].strip()

    code, out, _ = run_keys(tmp_path, "revoke", key.partition(":")[0])

    assert code == 0
    assert "Revoked" in out
    store = SQLiteJobStore(tmp_path / "jobs.db")
    try:
        assert store.find_api_key(hash_api_key(key)) is None
        assert not store.has_api_keys()
    finally:
        store.close()
    assert "active" not in run_keys(tmp_path, "list")[1]


def test_revoke_of_an_unknown_key_fails(tmp_path: Path) -> None:
    code, _, err = run_keys(tmp_path, "revoke", "no-such-key")

    assert code == 1
    assert "No active key" in err
