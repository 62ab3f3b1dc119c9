"""The openai backend's retry layer: the server's hints (``Retry-After`` in both forms,
``retry-after-ms``, ``x-should-retry``) and the caps on waits. The same hints end to end,
through the local test server, are in test_backend_openai.py."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx
import openai
import pytest

from selfalign.backends.retry import MAX_BACKOFF_S, backoff, classify, retry_after, should_retry

NOW = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)


def http_date(when: datetime) -> str:
    return format_datetime(when, usegmt=True)


# -- the hints, parsed --------------------------------------------------------------------
@pytest.mark.parametrize(
    "headers,seconds",
    [
        ({"retry-after": "3"}, 3.0),
        ({"retry-after": "0.5"}, 0.5),
        ({"retry-after": "-2"}, 0.0),
        ({"retry-after-ms": "250", "retry-after": "3"}, 0.25),  # the finer one wins
        ({"retry-after": http_date(NOW + timedelta(seconds=90))}, 90.0),
        ({"retry-after": http_date(NOW - timedelta(seconds=90))}, 0.0),  # already past
        ({"retry-after": "Sat, 01 Mar 2025 12:00:07 -0000"}, 7.0),  # no zone: UTC
        ({"retry-after": "soon"}, None),
        ({"retry-after-ms": "nan"}, None),
        ({}, None),
    ],
)
def test_retry_after_reads_seconds_and_http_dates(
    headers: dict[str, str], seconds: float | None
) -> None:
    assert retry_after(httpx.Headers(headers), now=NOW) == seconds


def test_retry_after_date_counts_from_the_clock() -> None:
    wait = retry_after({"retry-after": http_date(datetime.now(UTC) + timedelta(seconds=60))})
    assert wait is not None and 58 < wait <= 60


@pytest.mark.parametrize(
    "value,verdict",
    [("true", True), ("True", True), (" false ", False), ("maybe", None), (None, None)],
)
def test_should_retry_reads_the_header(value: str | None, verdict: bool | None) -> None:
    headers = httpx.Headers({} if value is None else {"x-should-retry": value})
    assert should_retry(headers) is verdict


def test_backoff_is_jittered_at_least_the_hint_and_capped() -> None:
    rng = random.Random(0)
    assert all(0 <= backoff(3, 1.0, None, rng) <= 4.0 for _ in range(100))
    assert all(backoff(1, 1.0, 2.5, rng) == 2.5 for _ in range(20))  # hint above the jitter
    assert backoff(1, 1.0, 24 * 3600.0, rng) == MAX_BACKOFF_S  # a date a day ahead
    assert backoff(60, 1.0, None, rng) <= MAX_BACKOFF_S


def status_error(status: int, headers: dict[str, str]) -> openai.APIStatusError:
    request = httpx.Request("POST", "http://server/v1/completions")
    response = httpx.Response(status, headers=headers, request=request)
    return openai.APIStatusError("injected", response=response, body=None)


@pytest.mark.parametrize(
    "status,header,retry",
    [
        (500, None, True),
        (500, "false", False),
        (429, "false", False),
        (400, None, False),
        (400, "true", True),
        (422, "true", True),
    ],
)
def test_x_should_retry_overrides_the_status(status: int, header: str | None, retry: bool) -> None:
    headers = {"retry-after": "2"} | ({} if header is None else {"x-should-retry": header})
    failure = classify(status_error(status, headers), "http://server/v1", "KEY", str)
    assert failure.reason.startswith(f"http_{status}")
    assert failure.retry is retry
    assert failure.wait_hint == (2.0 if retry else None)
