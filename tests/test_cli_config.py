"""Configuration composed: one Connection shared by SyncConfig and AuditConfig, retries as the one
count of attempts, enums for the closed sets, library messages in words with the setting at
fault, and the CLI naming its own option for that setting. Also the one progress renderer."""

from __future__ import annotations

import argparse
import io
from dataclasses import fields, replace
from pathlib import Path

import pytest

from crawler.cli import OPTIONS, Progress, audit_line, build_parser, main, sync_line
from crawler.config import AuditConfig, Connection, SyncConfig
from crawler.errors import ConfigError
from crawler.figures import Figures, RunProgress
from crawler.kinds import ChangeSource, Executor, FhirVersion
from crawler.http import RetryPolicy
from crawler.qido import client_from

URL = "http://127.0.0.1:9/dicom-web"

BAD_SYNC = [
    ({"fhir_user": "u"}, "fhir_user"),
    ({"fhir_password": "p"}, "fhir_user"),
    ({"fhir_token": "a\nb"}, "fhir_token"),
    ({"user": "u"}, "user"),
    ({"user": "u", "password": "p", "token": "t"}, "token"),
    ({"user": "u", "password": "p", "token_command": "c"}, "token_command"),
    ({"token": "t", "token_command": "c"}, "token"),
    ({"max_rps": 0}, "max_rps"),
    ({"timeout": (10.0, 0)}, "timeout"),
    ({"retries": -1}, "retries"),
    ({"max_response_mb": 0}, "max_response_mb"),
    ({"fhir_version": "R6"}, "fhir_version"),
    ({"executor": "processes"}, "executor"),
    ({"changes": "dcm4chee-someday"}, "changes"),
    ({"full": True, "since": "20200101"}, "full"),
    ({"lookback": -1}, "lookback"),
    ({"max_results": 0}, "max_results"),
    ({"fhir_ids": "theirs"}, "fhir_ids"),
    ({"scheduler": "tcp://10.0.0.5:8786"}, "scheduler"),
    ({"workers": 0}, "workers"),
    ({"worker_threads": 0}, "worker_threads"),
    ({"page_size": 0}, "page_size"),
    ({"checkpoint_every": 0}, "checkpoint_every"),
    ({"fhir_batch_size": 0}, "fhir_batch_size"),
    ({"max_offset": 0}, "max_offset"),
]

BAD_AUDIT = [
    ({"fhir_user": "u"}, "fhir_user"),
    ({"user": "u"}, "user"),
    ({"retries": -1}, "retries"),
    ({"since": "20200102", "until": "20200101"}, "since"),
    ({"instance_page_size": 0}, "instance_page_size"),
    ({"workers": 0}, "workers"),
]


def test_sync_and_audit_share_the_connection_fields_without_copying_them():
    names = [f.name for f in fields(Connection)]
    assert names[0] == "url" and "retries" in names and "verify" in names
    for config_class in (SyncConfig, AuditConfig):
        assert issubclass(config_class, Connection)
        assert [f.name for f in fields(config_class)][: len(names)] == names


def test_flat_construction_and_the_connection_of_each():
    sync_config = SyncConfig(url=URL, user="u", password="p", max_rps=5.0, retries=2, workers=3)
    audit_config = AuditConfig(url=URL, report=Path("report"), user="u", password="p", max_rps=5.0, retries=2)
    expected = Connection(url=URL, user="u", password="p", max_rps=5.0, retries=2)
    assert sync_config.connection == audit_config.connection == expected
    assert type(sync_config.connection) is Connection
    assert expected.connection is expected


def test_only_the_url_is_positional():
    assert SyncConfig(URL).url == Connection(URL).url == URL
    for build in (lambda: Connection(URL, "user"), lambda: SyncConfig(URL, "user"), lambda: AuditConfig(URL, Path("report"))):
        with pytest.raises(TypeError):
            build()


def test_retries_is_the_one_count_of_attempts():
    config = SyncConfig(url=URL, retries=2, retry=RetryPolicy(base_delay=0.01, max_delay=0.05))
    assert config.retry == RetryPolicy(attempts=3, base_delay=0.01, max_delay=0.05)
    assert replace(config, retries=0).retry.attempts == 1
    assert AuditConfig(url=URL, report=Path("r"), retries=7).retry.attempts == 8
    client = client_from(config)
    try:
        assert client.retry.attempts == 3
    finally:
        client.close()
    plain = client_from(Connection(url=URL, retries=0))
    try:
        assert plain.retry.attempts == 1
    finally:
        plain.close()


def test_enum_settings_take_strings_or_members_and_hold_members():
    config = SyncConfig(url=URL, executor="dask", fhir_version="R4", changes="orthanc")
    assert config.executor is Executor.DASK and config.fhir_version is FhirVersion.R4 and config.changes is ChangeSource.ORTHANC
    assert config.executor == "dask" and f"{config.fhir_version}" == "R4"
    assert SyncConfig(url=URL, executor=Executor.THREADS).executor is Executor.THREADS
    assert SyncConfig(url=URL).changes is None
    assert SyncConfig(url=URL).fhir_version is FhirVersion.R5


@pytest.mark.parametrize(("settings", "setting"), BAD_SYNC, ids=[s for _, s in BAD_SYNC])
def test_bad_sync_settings_name_the_setting_and_no_option(settings, setting):
    with pytest.raises(ConfigError) as caught:
        SyncConfig(url=URL, **settings)
    assert caught.value.setting == setting
    assert "--" not in str(caught.value)
    assert "\n" not in str(caught.value)
    assert setting in OPTIONS


@pytest.mark.parametrize(("settings", "setting"), BAD_AUDIT, ids=[s for _, s in BAD_AUDIT])
def test_bad_audit_settings_name_the_setting_and_no_option(settings, setting):
    with pytest.raises(ConfigError) as caught:
        AuditConfig(url=URL, report=Path("report"), **settings)
    assert caught.value.setting == setting
    assert "--" not in str(caught.value)
    assert setting in OPTIONS


def test_a_secret_in_a_bad_token_is_not_in_the_message():
    with pytest.raises(ConfigError) as caught:
        SyncConfig(url=URL, fhir_token="s3cret-token\n")
    assert "s3cret" not in str(caught.value)


def _options_of(command: str) -> set[str]:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return {opt for a in sub.choices[command]._actions for opt in a.option_strings}


def test_every_option_the_table_names_exists():
    known = _options_of("sync") | _options_of("audit")
    for setting, shown in OPTIONS.items():
        for option in shown.split("/"):
            assert option == "URL" or option in known, f"{setting}: {option}"


def test_every_setting_of_the_configs_has_an_option_or_is_library_only():
    library_only = {"retry", "checkpoint_seconds"}
    for config_class in (SyncConfig, AuditConfig):
        for f in fields(config_class):
            assert f.name in OPTIONS or f.name in library_only, f.name


@pytest.mark.parametrize(
    ("args", "shown"),
    [
        (["sync", URL, "--fhir-user", "u"], "--fhir-user/--fhir-password: the FHIR user and password go together"),
        (["sync", URL, "--user", "u"], "--user/--password: the user and password go together"),
        (["sync", URL, "--scheduler", "tcp://10.0.0.5:8786"], "--scheduler: a scheduler address goes with the dask executor"),
        (["sync", URL, "--full", "--since", "20200101"], "--full: a full listing"),
        (["sync", URL, "--lookback", "-1"], "--lookback: the lookback must be a number of days >= 0"),
        (["sync", URL, "--retries", "-1"], "--retries: retries must be an integer >= 0, not -1"),
        (["sync", URL, "--max-rps", "0"], "--max-rps: the request rate must be above 0"),
        (["sync", URL, "--timezone", "Mars/Olympus"], "--timezone: unknown time zone 'Mars/Olympus'"),
        (["audit", URL, "--report", "r", "--fhir-password", "p"], "--fhir-user/--fhir-password: the FHIR user and password go together"),
        (["audit", URL, "--report", "r", "--since", "20200102", "--until", "20200101"], "--since: the window starts (20200102) after it ends (20200101)"),
    ],
)
def test_the_cli_names_its_option_for_the_setting_at_fault(args, shown, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for name in ("QIDO_CRAWLER_FHIR_USER", "QIDO_CRAWLER_FHIR_PASSWORD", "QIDO_CRAWLER_USER", "QIDO_CRAWLER_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    code = main([*args, "--state", str(tmp_path / "s.db")] if args[0] == "sync" else args)
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(f"qido-crawler: error: {shown}"), err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "s.db").exists()


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_sync_display_names_crawled_and_saved_and_shows_the_pace_before_the_listing_is_complete():
    figures = Figures(studies_listed=12, studies_new=3, studies_changed=2, studies_unchanged=4, studies_rechecked=1,
                      studies_failed=1, studies_inconsistent=1)
    stream = Terminal()
    progress = Progress(stream, True, sync_line)
    running = RunProgress(figures, crawled=9, to_crawl=None, requests=40, retries=3, elapsed=2.0)
    progress(running)
    progress(running)  # within 0.1 s: not drawn again
    progress.close()
    assert stream.getvalue() == (
        "\rlisted 12  crawled 9  saved 6 (at checkpoints)  skipped unchanged 4\x1b[K\n"
        "listing: a percentage and an ETA once the listing is complete\x1b[K\n"
        "4.5 studies/s  elapsed 00:02  failed 2  requests 40  retries 3\x1b[J"
        "\r\x1b[2A\x1b[J"
    )


def test_the_sync_display_draws_a_bar_with_percentage_and_eta_once_the_listing_is_complete():
    figures = Figures(studies_listed=300, studies_new=100, studies_unchanged=4)
    line = sync_line(RunProgress(figures, crawled=120, to_crawl=296, requests=640, retries=0, elapsed=60.0))
    assert line.split("\n")[1] == " 41% |████████████▏                 | 120/296 to crawl  ETA 01:28"
    done = sync_line(RunProgress(Figures(studies_listed=4, studies_unchanged=4), crawled=0, to_crawl=0, requests=1, retries=0, elapsed=0.5))
    assert done.split("\n")[1] == "100% |██████████████████████████████| 0/0 to crawl  ETA 00:00"


def test_the_display_redraws_in_place_and_cuts_lines_to_the_terminal_width():
    stream = Terminal()
    progress = Progress(stream, True, lambda text: text)
    progress("a" * 200 + "\nb")
    progress.last = 0.0
    progress("c")
    progress.close()
    assert stream.getvalue() == (
        "\r" + "a" * 79 + "\x1b[K\nb\x1b[J"  # 80 columns when the width is unknown; the last column left free
        "\r\x1b[1Ac\x1b[J"  # back to the first line; the second erased
        "\r\x1b[J"
    )


def test_a_log_message_clears_the_display_first():
    import logging

    stream = Terminal()
    logger = logging.getLogger("crawler")
    handler = logging.StreamHandler(stream)
    logger.addHandler(handler)
    try:
        progress = Progress(stream, True, lambda text: text)
        progress("one\ntwo")
        logger.warning("study 1.2.3: refused")
        progress.close()
        logger.warning("after")
    finally:
        logger.removeHandler(handler)
    assert stream.getvalue() == "\rone\x1b[K\ntwo\x1b[J" "\r\x1b[1A\x1b[J" "study 1.2.3: refused\n" "after\n"


def test_the_audit_display_shows_read_unreadable_and_the_pace():
    from crawler.audit import AuditProgress

    listing = AuditProgress(studies_listed=7, studies_read=5, studies_unreadable=1, requests=12, retries=0, elapsed=2.0)
    assert audit_line(listing).split("\n") == [
        "listed 7  read 5",
        "listing: a percentage and an ETA once the listing is complete",
        "2.5 studies/s  elapsed 00:02  unreadable 1  requests 12  retries 0",
    ]
    listed = AuditProgress(studies_listed=8, studies_read=6, studies_unreadable=1, listing_complete=True, requests=14, retries=1, elapsed=3.0)
    assert listed.to_read == 8 and listed.fraction == 0.75 and listed.eta == 1.0
    assert audit_line(listed).split("\n")[1] == " 75% |██████████████████████▌       | 6/8 to read  ETA 00:01"


def test_a_disabled_renderer_writes_nothing():
    stream = Terminal()
    progress = Progress(stream, False, sync_line)
    progress(RunProgress(Figures(studies_listed=1), crawled=0, to_crawl=None, requests=1, retries=0, elapsed=0.1))
    progress.close()
    assert stream.getvalue() == ""
