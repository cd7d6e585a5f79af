from __future__ import annotations

from collections.abc import Iterator

import pytest
import tinker

from tests.integration.server import ServerProcess


@pytest.fixture(scope="session")
def server(tmp_path_factory, models_dir) -> Iterator[ServerProcess]:
    """The default server. The SDK is told to send at most 2 datums per forward_backward
    request, so every larger call arrives as concurrent chunks that must be put in order; and
    holds a pending poll 3 s, so tests can observe a "try again" answer."""
    proc = ServerProcess(tmp_path_factory.mktemp("server"), models_dir,
                         env={"TUNEFORGE_FWDBWD_MAX_CHUNK_LEN": "2",
                              "TUNEFORGE_LONG_POLL_SECONDS": "3"}).start()
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def service_client(server) -> Iterator[tinker.ServiceClient]:
    client = tinker.ServiceClient(base_url=server.base_url, api_key=server.api_key)
    yield client


@pytest.fixture(scope="session")
def postgres_url(tmp_path_factory) -> Iterator[str]:
    """A throwaway PostgreSQL server (the `pgserver` wheel bundles its binaries)."""
    import pgserver

    pg = pgserver.get_server(tmp_path_factory.mktemp("pgdata"), cleanup_mode="stop")
    yield pg.get_uri().replace("postgresql://", "postgresql+psycopg2://", 1)
    pg.cleanup()
