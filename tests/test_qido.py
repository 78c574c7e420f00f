from __future__ import annotations

import pytest

from crawler.errors import ConfigError
from crawler.planner import Window, plan
from crawler.http import check_base_url, redact, retry_after_seconds
from crawler.qido import build_query


def test_query_is_sorted_and_keeps_dicom_characters_raw():
    query = build_query([("limit", 10), ("includefield", "00201208"), ("StudyDate", "20240101-20240131"), ("includefield", "00080061"), ("PatientName", "A*,B")])
    assert query == "PatientName=A*,B&StudyDate=20240101-20240131&includefield=00080061&includefield=00201208&limit=10"
    assert build_query([("x", "a b&c")]) == "x=a%20b%26c"


def test_base_url_checks():
    assert check_base_url("http://h:8042/dicom-web/") == "http://h:8042/dicom-web"
    for bad in ("h:8042", "ftp://h/x", "http:///x", "http://h:70000/x", "http://h/x?a=b"):
        with pytest.raises(ConfigError):
            check_base_url(bad)


def test_redact_removes_credentials():
    assert redact("https://user:secret@h/dicom-web") == "https://h/dicom-web"


def test_redact_hides_passwords_in_state_urls_and_leaves_other_urls_byte_for_byte():
    url = "postgresql://crawler:s3cret@db.example:5432/qido?sslmode=require"
    assert redact(url, keep_user=True) == "postgresql://crawler:***@db.example:5432/qido?sslmode=require"
    assert redact(url) == "postgresql://db.example:5432/qido?sslmode=require"
    assert redact("postgresql://crawler@h/qido", keep_user=True) == "postgresql://crawler@h/qido"
    assert redact("postgresql://u:p@ss:w@h/db", keep_user=True) == "postgresql://u:***@h/db"
    assert redact("postgresql://h/db?password=s3cret&sslmode=require") == "postgresql://h/db?password=***&sslmode=require"
    assert redact("postgresql://h/db?sslmode=require&PassWord=s3cret") == "postgresql://h/db?sslmode=require&PassWord=***"
    assert redact("postgresql:///qido?host=/run/postgresql") == "postgresql:///qido?host=/run/postgresql"
    query = "http://h/dicom-web/studies?StudyDate=20240101-20240102&includefield=00080020,00100010&PatientName=A*%20B"
    assert redact(query) == query
    assert redact("http://ann:s3cret@h:bad/dicom-web") == "http://h:bad/dicom-web"
    assert "s3cret" not in redact("postgresql://u:s3cret@[::1/db", keep_user=True)


def test_retry_after():
    assert retry_after_seconds("7") == 7
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:05 GMT", now=1445412480.0) == 5
    assert retry_after_seconds("soon") is None


def test_windows():
    assert Window().params() == []
    assert Window("20240101", "20240131").params() == [("00080020", "20240101-20240131")]
    assert Window("20240101", None).params() == [("00080020", "20240101-")]
    assert Window("20240101", "20240101").params() == [("00080020", "20240101")]
    with pytest.raises(ConfigError):
        plan("20240201", "20240101")
