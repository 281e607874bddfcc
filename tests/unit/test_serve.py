"""`kontext-server serve` as a program: bind policy, worker supervision, no torch in the API."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kontext_server.cli.serve import is_loopback_host
from kontext_server.cli.supervisor import WorkerSpec, WorkerSupervisor, visible_gpus, worker_specs


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.0.2", True),
        ("localhost", True),
        ("::1", True),
        ("[::1]", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.168.1.10", False),
        ("example.com", False),
    ],
)
def test_loopback_hosts_are_recognised(host: str, loopback: bool) -> None:
    assert is_loopback_host(host) is loopback


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kontext_server", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
        check=False,
    )


def test_serve_refuses_a_public_bind_without_any_api_key(tmp_path: Path) -> None:
    done = run_cli("serve", "--host", "0.0.0.0", "--port", "0", "--data-dir", str(tmp_path))
    assert done.returncode != 0
    assert "no API key" in done.stderr and "--insecure-no-auth" in done.stderr


def test_the_api_process_never_imports_torch(tmp_path: Path) -> None:
    code = f"""
import sys
from pathlib import Path
from kontext_server.cli import app  # every command module, as `kontext-server` loads them
from kontext_server.config import Settings
from kontext_server.files import open_file_store
from kontext_server.http.app import create_app
from kontext_server.store import open_store
settings = Settings(data_dir=Path({str(tmp_path)!r}))
create_app(settings, open_store(settings.store_url()), open_file_store(settings.files_url()))
heavy = sorted(m for m in ("torch", "diffusers", "transformers") if m in sys.modules)
print(",".join(heavy) or "clean")
"""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "clean"


def test_visible_gpus_follow_cuda_visible_devices() -> None:
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "2,3"}) == ["2", "3"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "-1"}) == []
    specs = worker_specs(3, ["2", "3"], ["--model", "tiny"])
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in specs] == ["2", "3", "2"]
    assert worker_specs(1, [], [])[0].env == {}


def test_supervisor_restarts_a_worker_that_dies(tmp_path: Path) -> None:
    marker = tmp_path / "starts"
    # a "worker" that records its start and dies at once
    script = f"open({str(marker)!r}, 'a').write('x'); raise SystemExit(3)"
    supervisor = WorkerSupervisor([WorkerSpec([sys.executable, "-c", script])], poll_s=0.05)
    supervisor.start()
    try:
        deadline = time.monotonic() + 10
        while (
            time.monotonic() < deadline and len(marker.read_text() if marker.exists() else "") < 3
        ):
            time.sleep(0.05)
    finally:
        supervisor.stop(timeout_s=5)
    assert len(marker.read_text()) >= 3  # started, died, restarted (with backoff) twice


def test_supervisor_stop_terminates_running_workers() -> None:
    supervisor = WorkerSupervisor(
        [WorkerSpec([sys.executable, "-c", "import time; time.sleep(60)"])]
    )
    supervisor.start()
    pids = supervisor.pids
    assert len(pids) == 1
    started = time.monotonic()
    supervisor.stop(timeout_s=5)
    assert time.monotonic() - started < 5
    assert supervisor.pids == []


def test_workers_do_not_outlive_a_killed_supervisor() -> None:
    code = """
import sys, time
from kontext_server.cli.supervisor import WorkerSpec, WorkerSupervisor
sup = WorkerSupervisor([WorkerSpec([sys.executable, "-c", "import time; time.sleep(60)"])])
sup.start()
print(sup.pids[0], flush=True)
time.sleep(60)
"""
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    worker_pid = int(parent.stdout.readline())
    parent.kill()  # SIGKILL: no chance to stop its workers itself
    parent.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _alive(worker_pid):
        time.sleep(0.05)
    assert not _alive(worker_pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead too: it only waits for its (re)parent to reap it
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split()[2] != "Z"


def test_several_workers_get_input_prefetch_off_unless_the_operator_chose(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from kontext_server.cli.serve import worker_env
    from kontext_server.config import Settings

    monkeypatch.delenv("KONTEXT_PREFETCH_JOBS", raising=False)
    assert worker_env(Settings(), 1) == {}
    assert worker_env(Settings(), 4) == {"KONTEXT_PREFETCH_JOBS": "0"}
    monkeypatch.setenv("KONTEXT_PREFETCH_JOBS", "2")
    assert worker_env(Settings(), 4) == {}
