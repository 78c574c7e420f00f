"""The checkpoint ledger: what a run has crawled or found gone but not yet recorded, and the
protocol that records it.

Between checkpoints a crawled study is *held*: its changed resources are handed to the sinks at
once, its state waits. At a checkpoint every sink flushes (NDJSON: synced to disk with its sizes
recorded; FHIR server: transactions answered); the studies a sink refused are recorded as
failed, the rest as synced with their resources' hashes; deletions a sink accepted mark their
studies gone; only then is the state committed. A crash between the flush and the commit leaves
the state at the previous checkpoint: the next run sends those studies again (the NDJSON folder is
cut back to the same point, and a FHIR PUT of the same resource is idempotent).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import orjson

from .figures import Figures
from .kinds import StudyStatus
from .listing import study_date
from .sinks import Sink
from .sinks.base import Resource, learns_max_entries, learns_server_ids, takes_tags, uses_server_ids
from .state import State
from .worker import Outcome, digest, study_hash


def outcome_body(message: str) -> bytes:
    """An OperationOutcome line for the sinks that keep a study's error beside the resources."""
    return orjson.dumps(
        {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "processing", "diagnostics": message}]}
    )


@dataclass
class Held:
    """A crawled study waiting for the next checkpoint."""

    outcome: Outcome
    known: bool
    send: list[tuple[Resource, str]]
    """The resources the sinks were given, each with its digest."""
    study_digest: str


class Ledger:
    """One run's held studies, pending deletions and unrecorded listings, for one source.

    ``error`` records and logs a problem of one study (the run keeps the list it reports)."""

    def __init__(self, state: State, source: str, run_id: int, sinks: Sequence[Sink], figures: Figures,
                 error: Callable[[str], None]) -> None:
        self.state = state
        self.source = source
        self.run_id = run_id
        self.sinks = list(sinks)
        self.figures = figures
        self.error = error
        self.held: list[Held] = []
        self.deleting: list[tuple[str, str]] = []
        self.unrecorded: set[str] = set()
        """UIDs listed in this run that the state does not hold yet (until the next checkpoint)."""
        self.stored: dict[tuple[str, str], str | None] = {}
        self.last_checkpoint = time.monotonic()

    def due(self, every: int, seconds: float) -> bool:
        """Whether enough studies are held, or enough time has passed, for a checkpoint."""
        return len(self.held) >= every or time.monotonic() - self.last_checkpoint > seconds

    def listed(self, uid: str) -> None:
        """A listed study the state does not hold: listed again in this run, it is not crawled twice."""
        self.unrecorded.add(uid)

    def hold(self, outcome: Outcome, known: bool) -> None:
        """Hand a crawled study's changed resources to the sinks; its state waits for the
        checkpoint. A study that failed is recorded failed now (nothing of it was sent)."""
        summary = outcome.summary
        if outcome.status != StudyStatus.SYNCED:
            self.figures.studies_failed += outcome.status == StudyStatus.FAILED
            self.figures.studies_inconsistent += outcome.status == StudyStatus.INCONSISTENT
            self._refuse(summary.uid, outcome.error or f"study {summary.uid}: {outcome.status}", outcome.status, study_date(summary.attributes))
            self.unrecorded.discard(summary.uid)
            return
        digests = [digest(r[2]) for r in outcome.resources]
        send = [(r, d) for r, d in zip(outcome.resources, digests) if self._stored_hash(r[0], r[1]) != d or self._unknown_to_server(r)]
        for sink in self.sinks:
            if outcome.tags is not None and takes_tags(sink):
                # a study crawled again (its listing entry changed) may have new tag values while
                # its ImagingStudy is the same: the tables get its rows again
                sink.add_tags(summary.uid, outcome.tags)
                sink.add(summary.uid, [*(r for r, _ in send if r is not outcome.study), outcome.study])
            elif send:
                sink.add(summary.uid, [r for r, _ in send])
        self.held.append(Held(outcome, known, send, digests[-1]))

    def delete(self, uid: str, resource_id: str) -> None:
        """A study gone from the PACS: its ImagingStudy deleted from the sinks now, marked gone at
        the checkpoint if every sink accepted the deletion."""
        for sink in self.sinks:
            sink.delete(uid, "ImagingStudy", resource_id)
        self.deleting.append((uid, resource_id))

    def checkpoint(self) -> None:
        """Flush every sink, record what they took, commit."""
        refused: dict[str, str] = {}
        for sink in self.sinks:
            refused.update(sink.flush())
        figures, state = self.figures, self.state
        recorded: set[tuple[str, str, str]] = set()
        unrecorded: set[tuple[str, str, str]] = set()
        for held in self.held:
            summary = held.outcome.summary
            if summary.uid in refused:
                figures.studies_failed += 1
                unrecorded.update((t, i, d) for (t, i, _), d in held.send)
                self._refuse(summary.uid, f"study {summary.uid}: not accepted: {refused[summary.uid]}", StudyStatus.FAILED,
                             study_date(summary.attributes))
                continue
            if not held.known:
                figures.studies_new += 1
            elif any(resource_type != "Endpoint" for (resource_type, _, _), _ in held.send):
                figures.studies_changed += 1
            else:
                figures.studies_rechecked += 1
            for (resource_type, resource_id, body), body_digest in held.send:
                if (resource_type, resource_id, body_digest) not in recorded:
                    recorded.add((resource_type, resource_id, body_digest))
                    state.put_resource(resource_type, resource_id, body_digest, body)
                    if (resource_type, resource_id) in self.stored:
                        self.stored[resource_type, resource_id] = body_digest
                    figures.resources_written += 1
            _, study_resource_id, _ = held.outcome.study
            state.record_study(
                self.source, summary.uid, run_id=self.run_id, status=StudyStatus.SYNCED, resource_id=study_resource_id,
                n_series=summary.n_series, n_instances=summary.n_instances, study_hash=study_hash(dict(summary.attributes), held.outcome.tags.signature if held.outcome.tags else ()),
                resource_hash=held.study_digest, study_date=study_date(summary.attributes),
            )
        figures.resources_refused += len(unrecorded - recorded)
        self.unrecorded.difference_update(held.outcome.summary.uid for held in self.held)
        self.held.clear()
        for uid, resource_id in self.deleting:
            if uid in refused:
                figures.studies_failed += 1
                message = f"study {uid}: deletion not accepted: {refused[uid]}"
                self.error(message)
                for sink in self.sinks:
                    sink.error(outcome_body(message))
                continue
            state.mark_gone(self.source, uid, self.run_id)
            state.drop_resource("ImagingStudy", resource_id)
            figures.resources_deleted += 1
        self.deleting.clear()
        for sink in self.sinks:
            if learns_max_entries(sink) and sink.learned_max_entries is not None:
                state.set_fhir_max_entries(sink.base_url, sink.learned_max_entries)
            if learns_server_ids(sink):
                for (resource_type, resource_id), server_id in sink.take_server_ids().items():
                    state.set_fhir_server_id(sink.base_url, resource_type, resource_id, server_id)
        state.checkpoint()
        self.last_checkpoint = time.monotonic()

    def _refuse(self, uid: str, message: str, status: StudyStatus, day: str | None) -> None:
        """A study not recorded as synced: its error logged, told to the sinks, recorded with its status."""
        self.error(message)
        for sink in self.sinks:
            sink.error(outcome_body(message))
        self.state.record_study(self.source, uid, run_id=self.run_id, status=status, error=message, study_date=day)

    def _unknown_to_server(self, resource: Resource) -> bool:
        """With --fhir-ids server: a resource the FHIR server holds under no id the state knows
        (e.g. sent before without the option) is sent again, so that references to it resolve."""
        return any(sink.unknown_to_server(resource[0], resource[1]) for sink in self.sinks if uses_server_ids(sink))

    def _stored_hash(self, resource_type: str, resource_id: str) -> str | None:
        """The state's hash of a resource; the Endpoint's (the same in every study) kept in memory."""
        if resource_type != "Endpoint":
            return self.state.resource_hash(resource_type, resource_id)
        key = (resource_type, resource_id)
        if key not in self.stored:
            self.stored[key] = self.state.resource_hash(resource_type, resource_id)
        return self.stored[key]
