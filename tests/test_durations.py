"""watch's durations: seconds, or a number with a unit (s, m, h, d); anything else is exit 2."""

from __future__ import annotations

import pytest

from crawler.cli import build_parser, main


@pytest.mark.parametrize(("text", "seconds"), [("90", 90.0), ("2.5", 2.5), ("30s", 30.0), ("5m", 300.0), ("24h", 86400.0), ("1d", 86400.0),
                                               ("1.5h", 5400.0)])
def test_a_duration_is_seconds_or_carries_its_unit(text, seconds):
    args = build_parser().parse_args(["watch", "http://pacs/dicom-web", "--state", "s.db", "--out", "out", "--changes", "orthanc",
                                      "--reconcile-every", text])
    assert args.reconcile_every == seconds


@pytest.mark.parametrize("text", ["5x", "m", "-1m", "0", "inf", "1e999h", ""])
def test_anything_else_is_a_usage_error(text, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["watch", "http://pacs/dicom-web", "--state", "s.db", "--out", "out", "--changes", "orthanc", "--interval", text])
    assert stopped.value.code == 2
    assert "--interval" in capsys.readouterr().err


def test_the_defaults_are_shown_in_seconds(capsys):
    with pytest.raises(SystemExit):
        main(["watch", "--help"])
    assert "(default: 86400 s)" in capsys.readouterr().out.replace("\n", " ").replace("  ", " ")
