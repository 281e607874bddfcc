"""A real S3-compatible server for tests (moto's server mode); fixtures registered by the
conftests of tests/unit and tests/fault (this module sits in tests/, which is on pytest's
pythonpath, so every folder can import it).

``s3_server`` is one ``ThreadedMotoServer`` per session on 127.0.0.1 (a random free port),
spoken to over real HTTP; ``s3_bucket`` gives each test a fresh, empty bucket of its own, so
tests never see each other's objects. Moto accepts any credentials. Tests import
``S3Server`` from here (not from ``conftest``: every test folder has a module of that name).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto.server import ThreadedMotoServer

from kontext_server.config import Settings

__all__ = ["S3Server", "s3_bucket", "s3_server"]

S3_ACCESS_KEY_ID = "kontext-test"
S3_SECRET_ACCESS_KEY = "kontext-test-secret"
_bucket_numbers = itertools.count(1)


@dataclass
class S3Server:
    endpoint_url: str
    _client: Any = None

    def settings(self, data_dir: Path, **overrides: Any) -> Settings:
        """Settings pointing at this server: static credentials, path-style addressing."""
        values: dict[str, Any] = {
            "data_dir": data_dir,
            "s3_endpoint_url": self.endpoint_url,
            "s3_access_key_id": S3_ACCESS_KEY_ID,
            "s3_secret_access_key": S3_SECRET_ACCESS_KEY,
            "s3_path_style": True,
            **overrides,
        }
        return Settings(**values)

    def client(self) -> Any:
        """A plain boto3 client, to look at the bucket behind the store's back."""
        if self._client is None:  # made once: building a client takes a good part of a second
            self._client = boto3.session.Session().client(
                "s3",
                endpoint_url=self.endpoint_url,
                region_name="us-east-1",
                aws_access_key_id=S3_ACCESS_KEY_ID,
                aws_secret_access_key=S3_SECRET_ACCESS_KEY,
            )
        return self._client

    def create_bucket(self) -> str:
        name = f"kontext-test-{next(_bucket_numbers)}"
        self.client().create_bucket(Bucket=name)
        return name


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield S3Server(endpoint_url=f"http://{host}:{port}")
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> str:
    return s3_server.create_bucket()
