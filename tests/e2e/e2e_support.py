"""Helpers of the end-to-end tests: real ``kontext-server serve`` processes on loopback.

``ServerProcess`` starts the whole service (API + worker processes) as a subprocess in its
own process group, so a test can ``kill()`` all of it at once (SIGKILL, as a crash or a power
cut would) and ``start()`` it again on the same data dir and port. Everything here talks to
the server only over HTTP(S), as a user would.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import io
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

__all__ = [
    "ENDPOINT",
    "TERMINAL_STATUS",
    "ServerProcess",
    "TlsFiles",
    "make_input_data_uri",
    "make_tls_files",
    "wait_until_completed",
    "warm_up",
]

ENDPOINT = "fal-ai/flux-pro/kontext/max"
TERMINAL_STATUS = "COMPLETED"

# The tiny random model at its ~1 MP output bucket costs ~0.2 s per step on 2 CPU cores, so the
# e2e servers run 2 steps per edit unless a test asks for slower edits.
FAST_STEPS = 2


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def kontext_server_argv() -> list[str]:
    """The ``kontext-server`` console script of this interpreter's environment."""
    script = Path(sys.executable).parent / "kontext-server"
    if script.exists():
        return [str(script)]
    found = shutil.which("kontext-server")
    return [found] if found else [sys.executable, "-m", "kontext_server"]


def make_input_data_uri(width: int = 96, height: int = 64) -> str:
    """A small PNG (a colour gradient) as a ``data:`` URI; the worker needs no network."""
    image = Image.new("RGB", (width, height))
    image.putdata(
        [(x * 255 // width, y * 255 // height, 128) for y in range(height) for x in range(width)]
    )
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


@dataclass(frozen=True)
class TlsFiles:
    """A throwaway CA (trusted through ``SSL_CERT_FILE``) and a server cert for 127.0.0.1."""

    ca_cert: Path
    server_cert: Path
    server_key: Path


def make_tls_files(folder: Path) -> TlsFiles:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kontext-server e2e test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    folder.mkdir(parents=True, exist_ok=True)
    files = TlsFiles(folder / "ca.pem", folder / "server.pem", folder / "server-key.pem")
    files.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.server_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.server_key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return files


class ServerProcess:
    """``kontext-server serve --model tiny`` as a real subprocess in its own process group.

    The port is chosen once, so a restarted server answers at the same URLs. Output of every
    run goes to ``log_path`` (appended), and ``log_tail()`` puts it into failure messages.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        workers: int = 1,
        env: Mapping[str, str] | None = None,
        tls: TlsFiles | None = None,
        port: int | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.workers = workers
        self.extra_env = dict(env or {})
        self.tls = tls
        self.port = port or free_port()
        self.log_path = data_dir.parent / f"{data_dir.name}-server.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def argv(self) -> list[str]:
        argv = [
            *kontext_server_argv(),
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--model",
            "tiny",
            "--data-dir",
            str(self.data_dir),
            "--workers",
            str(self.workers),
        ]
        if self.tls:
            argv += [
                "--ssl-certfile",
                str(self.tls.server_cert),
                "--ssl-keyfile",
                str(self.tls.server_key),
            ]
        return argv

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "HF_HUB_OFFLINE": "1",
                "KONTEXT_DEFAULT_STEPS": str(FAST_STEPS),
                # The tests' timing (a request caught queued or mid-edit) assumes CPU speed.
                "KONTEXT_DEVICE": "cpu",
                "KONTEXT_LOG_LEVEL": "INFO",
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.update(self.extra_env)
        return env

    def start(self, timeout_s: float = 30.0) -> None:
        """Start the service and wait until its HTTP API answers (workers may still load)."""
        if self._process is not None and self._process.poll() is None:
            raise RuntimeError("server already running")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            log.write(f"\n===== start {' '.join(self.argv())}\n".encode())
            log.flush()
            self._process = subprocess.Popen(
                self.argv(),
                env=self.environment(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: kill() takes the workers too
            )
        self.wait_until_answering(timeout_s)

    def wait_until_answering(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        verify: Any = str(self.tls.ca_cert) if self.tls else True
        while time.monotonic() < deadline:
            if self._process is not None and self._process.poll() is not None:
                raise RuntimeError(
                    f"server exited with {self._process.returncode}\n{self.log_tail()}"
                )
            with contextlib.suppress(httpx.TransportError):
                # Any HTTP answer (even a 404) means the API is up.
                httpx.get(f"{self.base_url}/.well-known/jwks.json", verify=verify, timeout=2.0)
                return
            time.sleep(0.1)
        raise RuntimeError(f"server did not answer within {timeout_s} s\n{self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL the whole service (API and workers) at once, like a crash."""
        if self._process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._process.pid, signal.SIGKILL)
        self._process.wait(timeout=10)
        self._process = None

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM the process group (graceful), SIGKILL what is left after ``timeout_s``."""
        if self._process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._process.wait(timeout=timeout_s)
        # Workers live in the same group; whatever outlived the API goes now.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._process.wait(timeout=5)
        self._process = None

    def log_tail(self, max_chars: int = 6000) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no server log)"
        return "----- server log (tail) -----\n" + text[-max_chars:]


def wait_until_completed(
    client: httpx.Client, status_url: str, *, timeout_s: float, poll_s: float = 0.1
) -> dict[str, Any]:
    """Poll a status URL until COMPLETED; returns the last status body."""
    deadline = time.monotonic() + timeout_s
    while True:
        response = client.get(status_url, params={"logs": "1"})
        assert response.status_code in (200, 202), response.text
        body: dict[str, Any] = response.json()
        if body["status"] == TERMINAL_STATUS:
            return body
        if time.monotonic() > deadline:
            raise AssertionError(f"not completed after {timeout_s} s: {body}")
        time.sleep(poll_s)


def warm_up(server: ServerProcess, *, timeout_s: float = 90.0) -> None:
    """Run one edit end to end with plain HTTP, so tests start with a loaded worker."""
    verify: Any = str(server.tls.ca_cert) if server.tls else True
    with httpx.Client(base_url=server.base_url, verify=verify, timeout=10.0) as client:
        response = client.post(
            f"/{ENDPOINT}", json={"prompt": "warm up", "image_url": make_input_data_uri()}
        )
        assert response.status_code == 200, f"{response.text}\n{server.log_tail()}"
        try:
            final = wait_until_completed(client, response.json()["status_url"], timeout_s=timeout_s)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{server.log_tail()}") from exc
        assert "error" not in final or final["error"] is None, f"{final}\n{server.log_tail()}"
