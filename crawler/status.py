"""What ``qido-crawler status`` says: per source, the last run, the window the next run will list,
the studies by status, what was learned about the server, and one line of advice per problem.

Pure: the CLI reads the facts from the state (opened read-only) into ``SourceFacts`` and prints
what ``report`` makes of them, as JSON or as the lines of ``render``; both come from the same
object, so the two forms cannot say different things. Error texts arrive here already masked
(one line, no credentials): they name studies by UID and causes, never patients.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

SCHEMA_VERSION = 1
"""Version of the ``status --json`` object; raised when a key changes meaning or goes."""

STATUSES = ("synced", "failed", "inconsistent", "gone")

MAIN_FIGURES = (
    "studies_listed", "studies_new", "studies_changed", "studies_unchanged", "studies_failed",
    "studies_inconsistent", "studies_gone", "resources_written", "resources_deleted", "windows_incomplete",
)


@dataclass(frozen=True)
class RunFacts:
    """A run as the state records it. ``outcome`` None: it never recorded its end; ``alive`` then
    says whether its process still runs on this machine (None: cannot be told, e.g. PostgreSQL)."""

    id: int
    started: str
    ended: str | None
    outcome: str | None
    figures: dict[str, Any] | None
    folder: str | None = None
    alive: bool | None = None
    error: str | None = None


@dataclass(frozen=True)
class StudyCount:
    count: int
    first_run: int | None = None
    last_run: int | None = None


@dataclass(frozen=True)
class FailedStudy:
    study_uid: str
    status: str
    last_run: int | None
    error: str | None


@dataclass(frozen=True)
class SourceFacts:
    source: str
    last_run: RunFacts | None = None
    unended: tuple[RunFacts, ...] = ()
    mark: str | None = None
    changes_cursor: tuple[str, str] | None = None
    """(change source, where it was read up to), e.g. ("orthanc", "4711")."""
    studies: dict[str, StudyCount] = field(default_factory=dict)
    oldest_failed: FailedStudy | None = None
    gone_still_held: int = 0
    cap: int | None = None
    verified: int = 0
    fallbacks: dict[str, str] = field(default_factory=dict)
    copied_as_of: tuple[int, str] | None = None
    """(run id, start) of the newest run that ended whole (ok or partial): the copy holds what
    the PACS held then (and what later polls of a watch brought)."""
    server_profile: tuple[str, str] | None = None
    """(profile, how it was chosen) of the source's last run that listed (see profiles)."""


def parse_time(text: str | None) -> datetime | None:
    """A run's ISO time (UTC when it names no offset); None when absent or unreadable."""
    if not text:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def age_in_words(seconds: float) -> str:
    """``"just now"``, ``"40 s ago"``, ``"12 min ago"``, ``"2 h ago"``, ``"3 days ago"``."""
    if seconds < 5:
        return "just now"
    if seconds < 60:
        return f"{int(seconds)} s ago"
    if seconds < 3600:
        return f"{int(seconds // 60)} min ago"
    if seconds < 48 * 3600:
        return f"{int(seconds // 3600)} h ago"
    return f"{int(seconds // 86400)} days ago"


def next_window(mark: str | None, lookback: int) -> dict[str, Any]:
    """The StudyDate window an incremental run (no --full, --since or --until) will list, as the
    sync chooses it: everything until a run has listed completely, then from its mark minus the
    lookback."""
    if mark is None:
        return {"full": True, "since": None, "mark": None, "lookback_days": lookback,
                "text": "lists everything (no complete listing yet)"}
    try:
        since = (datetime.strptime(mark, "%Y%m%d") - timedelta(days=lookback)).strftime("%Y%m%d")
    except ValueError:
        return {"full": True, "since": None, "mark": mark, "lookback_days": lookback,
                "text": f"lists everything (the mark {mark!r} is not a date)"}
    return {"full": False, "since": since, "mark": mark, "lookback_days": lookback,
            "text": f"lists from {since} (mark {mark} - {lookback} days)"}


def _plural(n: int, word: str) -> str:
    many = word[:-1] + "ies" if word.endswith("y") else word + "s"
    return f"{n:,} {word if n == 1 else many}"


def _runs_text(count: StudyCount) -> str:
    if count.first_run is None:
        return ""
    if count.first_run == count.last_run:
        return f"run {count.last_run}"
    return f"runs {count.first_run} to {count.last_run}"


def _outcome(run: RunFacts) -> str:
    if run.outcome is not None:
        return run.outcome
    if run.alive is None:
        return "not ended"
    return "running" if run.alive else "interrupted"


def _run(run: RunFacts, now: datetime) -> dict[str, Any]:
    moment = parse_time(run.ended) or parse_time(run.started)
    age = max((now - moment).total_seconds(), 0.0) if moment else None
    stored = run.figures or {}
    figures: dict[str, Any] = {k: stored[k] for k in MAIN_FIGURES if k in stored}
    requests = stored.get("requests")
    if isinstance(requests, dict) and "total" in requests:
        figures["requests"] = requests["total"]
        figures["retries"] = requests.get("retries", 0)
    if "seconds" in stored:
        figures["seconds"] = stored["seconds"]
    return {
        "id": run.id, "started": run.started, "ended": run.ended, "outcome": _outcome(run),
        "age_seconds": None if age is None else round(age), "age": None if age is None else age_in_words(age),
        "figures": figures, "error": run.error, "folder": run.folder,
    }


def _advice(facts: SourceFacts, last: dict[str, Any] | None, now: datetime, retry_per_run: int) -> list[dict[str, str]]:
    advice: list[dict[str, str]] = []

    def say(code: str, message: str) -> None:
        advice.append({"code": code, "message": message})

    for run in facts.unended:
        started = parse_time(run.started)
        when = age_in_words(max((now - started).total_seconds(), 0.0)) if started else "at an unknown time"
        if run.alive:
            say("running", f"run {run.id} is running now (started {when}): wait for it; a second run on this state is refused meanwhile")
        elif run.alive is None:
            say("not_ended", f"run {run.id} (started {when}) has not ended: it is running now, or was interrupted, "
                             "and then the next run recovers it")
        else:
            say("interrupted", f"an interrupted run (run {run.id}, started {when}): the next run recovers it "
                               "(the state stands at its last checkpoint; its folder is completed or removed)")
    if last is not None and last["outcome"] == "unreachable":
        say("unreachable", f"last run ended unreachable {last['age']}: the source could not be reached; check the URL and network")
    elif last is not None and last["outcome"] == "failed":
        say("run_failed", f"last run failed {last['age']}{' (see its error)' if last['error'] else ''}: the state keeps what "
                          "its checkpoints committed, and the next run goes on from there once the cause is fixed")
    if last is not None and last["figures"].get("windows_incomplete"):
        n = last["figures"]["windows_incomplete"]
        say("listing_incomplete", f"the last run could not list {_plural(n, 'window')} completely: the mark did not move and "
                                  "nothing there was marked gone; the next run lists them again (a result cap the server "
                                  "does not announce: give it with --max-results)")
    if facts.mark is None:
        say("no_complete_listing", "no complete listing yet: the next run lists everything")
    failed = facts.studies.get("failed")
    if failed and failed.count:
        rounds = -(-failed.count // retry_per_run)
        they = "it is" if failed.count == 1 else "they are"
        say("failed", f"{_plural(failed.count, 'study')} failed (last tried in {_runs_text(failed)}): {they} asked for again "
                      f"by UID each run (at most {retry_per_run:,} a run{f', so about {rounds} runs' if rounds > 1 else ''}); "
                      "the errors name the cause")
    inconsistent = facts.studies.get("inconsistent")
    if inconsistent and inconsistent.count:
        they = "it is" if inconsistent.count == 1 else "they are"
        say("inconsistent", f"{_plural(inconsistent.count, 'study')} inconsistent (last tried in {_runs_text(inconsistent)}): the "
                            f"server's count of instances disagrees with the instances it lists; {they} asked for again each "
                            "run until the two agree")
    gone = facts.studies.get("gone")
    if gone and facts.gone_still_held:
        say("gone_kept", f"{_plural(gone.count, 'study')} gone from the PACS (found in {_runs_text(gone)}), "
                         f"{facts.gone_still_held:,} still in the state and in `export`: found without --prune, and a later "
                         "--prune run deletes only what it finds gone itself")
    return advice


def source_report(facts: SourceFacts, now: datetime, lookback: int, retry_per_run: int) -> dict[str, Any]:
    """One source's part of the ``status --json`` object (see README, *status*)."""
    last = _run(facts.last_run, now) if facts.last_run is not None else None
    studies = {status: facts.studies[status].count if status in facts.studies else 0 for status in STATUSES}
    studies.update({status: c.count for status, c in facts.studies.items() if status not in studies})
    oldest = facts.oldest_failed
    return {
        "source": facts.source,
        "last_run": last,
        "next_window": next_window(facts.mark, lookback),
        "changes_cursor": None if facts.changes_cursor is None else {"feed": facts.changes_cursor[0], "cursor": facts.changes_cursor[1]},
        "lag": _lag(facts.copied_as_of, now),
        "studies": studies,
        "oldest_failed": None if oldest is None else {
            "study_uid": oldest.study_uid, "status": oldest.status, "last_run": oldest.last_run, "error": oldest.error},
        "cap": facts.cap,
        "verified": facts.verified,
        "fallbacks": dict(sorted(facts.fallbacks.items())),
        "server_profile": None if facts.server_profile is None else {"name": facts.server_profile[0], "how": facts.server_profile[1]},
        "advice": _advice(facts, last, now, retry_per_run),
    }


def _lag(copied: tuple[int, str] | None, now: datetime) -> dict[str, Any] | None:
    """How far the copy is behind the PACS, at most: since the start of the newest whole run."""
    moment = parse_time(copied[1]) if copied else None
    if copied is None or moment is None:
        return None
    seconds = max((now - moment).total_seconds(), 0.0)
    return {"run": copied[0], "since": copied[1], "seconds": round(seconds), "text": "a few seconds" if seconds < 5 else age_in_words(seconds).removesuffix(" ago")}


def report(shown_state: str, schema: int, sources: list[SourceFacts], now: datetime, *, lookback: int, retry_per_run: int,
           legacy: dict[str, Any] | None = None) -> dict[str, Any]:
    """The whole ``status --json`` object. ``legacy`` keeps the keys earlier versions printed
    (``studies`` over every source, ``runs``, ``problems``) for scripts that read them."""
    return {
        **(legacy or {}),
        "schema_version": SCHEMA_VERSION,
        "state": shown_state,
        "schema": schema,
        "now": now.replace(microsecond=0).isoformat(),
        "sources": [source_report(facts, now, lookback, retry_per_run) for facts in sources],
    }


def _figures_text(run: dict[str, Any]) -> str:
    f = run["figures"]
    words = [(k, k.removeprefix("studies_")) for k in MAIN_FIGURES if k.startswith("studies_") and k in f and (f[k] or k == "studies_listed")]
    parts = [", ".join(f"{name} {f[key]:,}" for key, name in words)] if words else []
    if "resources_written" in f:
        parts.append(f"{f['resources_written']:,} resources written")
    if f.get("resources_deleted"):
        parts.append(f"{f['resources_deleted']:,} deleted")
    if "requests" in f:
        parts.append(f"{_plural(f['requests'], 'request')}" + (f" ({f['retries']:,} retried)" if f.get("retries") else ""))
    if "seconds" in f:
        parts.append(f"{f['seconds']:.1f} s")
    return "; ".join(parts)


def render(status: dict[str, Any]) -> list[str]:
    """The human form of a ``report`` object, line by line."""
    lines = [f"state {status['state']} (schema {status['schema']})"]
    if not status["sources"]:
        lines.append("  no runs yet: the first sync of a source lists everything")
    for source in status["sources"]:
        lines.append(f"source {source['source']}")
        run = source["last_run"]
        if run is None:
            lines.append("  last run: none yet")
        else:
            when = f"{run['age']} ({run['started']})" if run["age"] else run["started"]
            figures = _figures_text(run)
            lines.append(f"  last run: run {run['id']}, {when}: {run['outcome']}" + (f"; {figures}" if figures else ""))
            if run["error"]:
                lines.append(f"    error: {run['error']}")
        lines.append(f"  next run: {source['next_window']['text']}")
        lag = source["lag"]
        if lag is not None:
            lines.append(f"  lag: at most {lag['text']} (the copy holds what the PACS held when run {lag['run']} started, {lag['since']})")
        feed = source["changes_cursor"]
        if feed is not None:
            lines.append(f"  change feed: {feed['feed']}, read up to {feed['cursor']} (the next run with --changes {feed['feed']} reads on from there)")
        else:
            lines.append("  change feed: none (--changes qido: StudyDate windows only; a study stored late with an old date, and a "
                         "change to an old study, wait for a --full run; see README \"Keeping up in near real time\")")
        counts = source["studies"]
        order = [s for s in STATUSES if s in counts] + sorted(s for s in counts if s not in STATUSES)
        lines.append("  studies: " + ", ".join(f"{counts[status]:,} {status}" for status in order))
        oldest = source["oldest_failed"]
        if oldest is not None:
            lines.append(f"  oldest failed: {oldest['study_uid']} ({oldest['status']}, run {oldest['last_run']})"
                         + (f": {oldest['error']}" if oldest["error"] else ""))
        profile = source["server_profile"]
        if profile is not None and profile["how"] != "default":
            lines.append(f"  server profile: {profile['name']} ({profile['how']})")
        if source["cap"] is not None:
            lines.append(f"  server: a cap of {source['cap']:,} results per query (learned; windows are split under it)")
        else:
            lines.append(f"  server: no result cap found (listings of up to {source['verified']:,} studies checked)")
        for name, reason in source["fallbacks"].items():
            lines.append(f"  fallback: {name} ({reason})")
        advice = source["advice"]
        if advice:
            lines.append("  to do:")
            lines.extend(f"    - {item['message']}" for item in advice)
        else:
            lines.append("  to do: nothing")
    return lines
