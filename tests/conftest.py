"""Shared fixtures: a real Orthanc with the DICOMweb plugin, filled with the fixture corpus."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from fixtures import corpus, orthanc

if TYPE_CHECKING:
    from fixtures.medplum import MedplumServer


@pytest.fixture(scope="session")
def corpus_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return corpus.all_files(tmp_path_factory.mktemp("corpus"))


@pytest.fixture
def live(corpus_files: list[Path], tmp_path: Path) -> Iterator[orthanc.Orthanc]:
    """A fresh Orthanc loaded with the corpus, per test, for tests that change what it holds."""
    with orthanc.running(corpus_files, root=tmp_path / "orthanc", config={"OverwriteInstances": True}) as server:
        yield server


@pytest.fixture(scope="session")
def pacs(corpus_files: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[orthanc.Orthanc]:
    """A live Orthanc loaded with the corpus, shared by tests that only read from it."""
    with orthanc.running(corpus_files, root=tmp_path_factory.mktemp("orthanc")) as server:
        yield server


@pytest.fixture(scope="session")
def corpus_study_uids(corpus_files: list[Path]) -> set[str]:
    import pydicom

    return {pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID for p in corpus_files}


@pytest.fixture(scope="session")
def medplum(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., MedplumServer]]:
    """Starts FHIR R4 servers built from Medplum's packages (fixtures/medplum.py), each empty:
    ``medplum()`` in the default mode, ``medplum("--transactions-as-batches", "--minimal")`` in
    others; all are stopped at the end of the session."""
    from fixtures import medplum as harness

    started: list[MedplumServer] = []

    def start(*flags: str) -> MedplumServer:
        server = harness.start(tmp_path_factory.mktemp("medplum"), *flags)
        started.append(server)
        return server

    try:
        yield start
    finally:
        for server in started:
            server.stop()


@pytest.fixture(scope="session")
def postgres_server():
    """A throw-away PostgreSQL (fixtures/postgres.py) for the PostgreSQL-state tests; each test
    makes its own database with ``postgres_server.create_database()``."""
    from fixtures import postgres

    with postgres.running() as server:
        yield server
