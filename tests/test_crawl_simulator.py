"""The benchmarks' simulator process answers in full, each answer the configured latency after its request."""

from __future__ import annotations

import time

import requests

from benchmarks.simulator import simulator
from fixtures.fakepacs import FakePacs


def test_answers_are_complete_and_come_the_latency_after_the_request():
    latency = 0.05
    with FakePacs(n_studies=30, seed=9) as reference, simulator(30, 9, latency) as sim:
        session = requests.Session()
        for path in ("studies?limit=30&includefield=00081030", f"studies/{reference.study_uid(4)}/instances", f"studies/{reference.study_uid(4)}/metadata"):
            expected = session.get(f"{reference.url}/{path}", timeout=10)
            started = time.perf_counter()
            answer = session.get(f"{sim.url}/{path}", timeout=10)
            took = time.perf_counter() - started
            assert answer.status_code == expected.status_code == 200
            assert answer.content == expected.content.replace(reference.url.encode(), sim.url.encode())
            assert latency <= took < latency + 1.0, (path, took)
        assert sim.counts()["requests"] == {"studies": 1, "instances": 1, "metadata": 1}
