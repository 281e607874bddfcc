"""A throwaway PostgreSQL cluster for tests: ``initdb`` + ``pg_ctl`` on a private socket.

The cluster listens on a Unix socket only (``listen_addresses=''``) inside its own temporary
folder, with durability off (``fsync``, ``synchronous_commit``, ``full_page_writes``): it
is fast, private to the test session, and gone afterwards. ``stop()``/``start()`` let fault
tests take PostgreSQL away and bring it back on the same data.

PostgreSQL refuses to run as root; when the tests run as root the server runs as the
``postgres`` user (Debian's package creates it) or ``nobody``.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

__all__ = ["PgCluster", "find_pg_bin_dir"]

PORT = 5432  # the socket is private to the cluster's folder, so the port never clashes
SERVER_OPTIONS = (
    "-c listen_addresses='' -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
    " -c max_connections=200"
)


def find_pg_bin_dir() -> Path | None:
    """The folder holding ``initdb`` and ``pg_ctl``: on PATH, else Debian's
    ``/usr/lib/postgresql/<version>/bin`` (newest version); ``None`` if neither exists."""
    on_path = shutil.which("initdb")
    if on_path is not None:
        return Path(on_path).resolve().parent
    candidates = glob.glob("/usr/lib/postgresql/*/bin/initdb")
    if not candidates:
        return None
    newest = max(candidates, key=lambda p: int(Path(p).parent.parent.name.split(".")[0]))
    return Path(newest).parent


def _server_user() -> str | None:
    """The user to run the server as when we are root (``None``: run as ourselves)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
        except KeyError:
            continue
        return name
    raise RuntimeError("running as root and no 'postgres' or 'nobody' user to run PostgreSQL")


class PgCluster:
    """One cluster in a temporary folder. ``dsn(dbname)`` gives a libpq URL for it."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin_dir = bin_dir
        self.folder = Path(tempfile.mkdtemp(prefix="kontext-pg-"))
        self.data_dir = self.folder / "data"
        self.socket_dir = self.folder / "sock"
        self.log_file = self.folder / "server.log"
        self._user = _server_user()
        self._running = False
        self.socket_dir.mkdir()
        if self._user is not None:
            entry = pwd.getpwnam(self._user)
            for path in (self.folder, self.socket_dir):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        atexit.register(self.destroy)  # also when the session dies before its teardown
        self._run(
            "initdb",
            "-D",
            str(self.data_dir),
            "--auth=trust",
            "-U",
            "postgres",
            "--no-sync",
            "--no-instructions",
            "-E",
            "UTF8",
            "--locale=C",
        )

    def _run(self, program: str, *args: str) -> None:
        completed = subprocess.run(
            [str(self.bin_dir / program), *args],
            capture_output=True,
            text=True,
            user=self._user,
            cwd=self.folder,
            check=False,
            timeout=120,
        )
        if completed.returncode != 0:
            raise RuntimeError(
                f"{program} failed ({completed.returncode}):\n{completed.stdout}"
                f"\n{completed.stderr}\n{self._log_tail()}"
            )

    def _log_tail(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def start(self) -> None:
        options = f"-k {self.socket_dir} -p {PORT} {SERVER_OPTIONS}"
        self._run(
            "pg_ctl",
            "-D",
            str(self.data_dir),
            "-l",
            str(self.log_file),
            "-o",
            options,
            "-w",
            "-t",
            "60",
            "start",
        )
        self._running = True

    def stop(self, mode: str = "fast") -> None:
        """``mode``: ``fast`` (clients disconnected, clean shutdown) or ``immediate``."""
        if self._running:
            self._run("pg_ctl", "-D", str(self.data_dir), "-m", mode, "-w", "-t", "60", "stop")
            self._running = False

    def dsn(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@/{dbname}?host={self.socket_dir}&port={PORT}"

    def create_database(self, dbname: str) -> str:
        """Creates ``dbname`` (an identifier: letters, digits, ``_``); returns its DSN."""
        import psycopg

        if not dbname.replace("_", "").isalnum():
            raise ValueError(f"not a plain database name: {dbname!r}")
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {dbname}")
        return self.dsn(dbname)

    def destroy(self) -> None:
        """Stops the server (if running) and removes every file. Safe to call twice."""
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            self.stop("immediate")  # a dead server is fine: still remove the files
        shutil.rmtree(self.folder, ignore_errors=True)
