"""Fixtures of the end-to-end tests: a live ``kontext-server serve`` shared by the client tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from e2e_support import ServerProcess, make_input_data_uri, warm_up


@pytest.fixture(scope="session")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One plain-http server (1 worker, tiny model, 2 steps) shared by the client tests."""
    server = ServerProcess(tmp_path_factory.mktemp("e2e") / "data")
    try:
        server.start()
        warm_up(server)
        yield server
    finally:
        server.stop()


@pytest.fixture
def input_image_uri() -> str:
    return make_input_data_uri()
