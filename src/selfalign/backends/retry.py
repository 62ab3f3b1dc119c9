"""Retries and endpoint failover for the openai backend.

Retries are ours, not the client's (``max_retries=0``): that way every retry is counted
by reason in ``stats.retry_reasons``, and a malformed JSON body (which the client raises
as a bare ``JSONDecodeError``) is retried like a 5xx. The server's hints are honoured:
``x-should-retry: true|false`` overrides what the status alone would decide, and the wait
is at least ``retry-after-ms`` or ``Retry-After`` (seconds or an HTTP date); otherwise it
is exponential backoff with full jitter. No wait exceeds ``MAX_BACKOFF_S``. Each call goes
to the endpoint with the least work; a retry goes to another one where there is one.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import TypeVar

import openai
import pydantic

from selfalign.backends.base import BackendStats
from selfalign.errors import InputError

T = TypeVar("T")
MAX_BACKOFF_S = 30.0


class RequestFailed(RuntimeError):
    """A request failed after all retries, or with an error that must not be retried."""


class BadResponse(Exception):
    """The server answered 200 with something that is not a usable completion."""


@dataclass
class Endpoint:
    url: str
    client: openai.AsyncOpenAI
    slots: asyncio.Semaphore
    assigned: int = 0  # requests routed here and not finished yet


@dataclass(frozen=True)
class Failure:
    """One failed attempt: the reason (its tag before ``:`` is counted), whether to
    retry, and the wait the server asked for (seconds)."""

    reason: str
    retry: bool
    wait_hint: float | None = None


class RetryingEndpoints:
    """Runs calls against a set of endpoints with retries and failover."""

    def __init__(
        self,
        endpoints: list[Endpoint],
        stats: BackendStats,
        *,
        max_retries: int,
        backoff_s: float,
        api_key_env: str,
        redact: Callable[[str], str],
    ) -> None:
        self.endpoints, self.stats = endpoints, stats
        self.max_retries, self.backoff_s = max_retries, backoff_s
        self.api_key_env, self.redact = api_key_env, redact
        self._rng = random.Random()
        self._turn = 0

    async def call(self, fn: Callable[[openai.AsyncOpenAI], Awaitable[T]]) -> T:
        """``fn(client)``'s result; ``RequestFailed`` once retries cannot help, and
        ``InputError`` at once for what only the user can fix (key, model name)."""
        attempt, last = 0, None
        while True:
            endpoint = self._pick(avoid=last)
            endpoint.assigned += 1
            try:
                async with endpoint.slots:
                    return await fn(endpoint.client)
            except Exception as exc:
                failure = classify(exc, endpoint.url, self.api_key_env, self.redact)
            finally:
                endpoint.assigned -= 1
            if not failure.retry or attempt >= self.max_retries:
                self.stats.failures += 1
                if failure.retry:
                    raise RequestFailed(f"{failure.reason} (after {attempt} retries)")
                raise RequestFailed(failure.reason)
            attempt += 1
            tag = failure.reason.split(":")[0]
            self.stats.retries += 1
            self.stats.retry_reasons[tag] = self.stats.retry_reasons.get(tag, 0) + 1
            last = endpoint
            await asyncio.sleep(backoff(attempt, self.backoff_s, failure.wait_hint, self._rng))

    def _pick(self, avoid: Endpoint | None) -> Endpoint:
        """The endpoint with the least work; on a retry, another one if there is one."""
        pool = [e for e in self.endpoints if e is not avoid] or self.endpoints
        self._turn += 1
        n = len(pool)
        return min((pool[(self._turn + i) % n] for i in range(n)), key=lambda e: e.assigned)


def backoff(attempt: int, base_s: float, hint: float | None, rng: random.Random) -> float:
    """Seconds before retry number ``attempt``: full jitter over ``base_s * 2**(attempt-1)``,
    at least the server's hint, and never more than ``MAX_BACKOFF_S``."""
    ceiling = min(MAX_BACKOFF_S, base_s * 2 ** (attempt - 1))
    wait = rng.uniform(0, ceiling)
    return max(wait, min(hint, MAX_BACKOFF_S)) if hint is not None else wait


def classify(exc: Exception, url: str, api_key_env: str, redact: Callable[[str], str]) -> Failure:
    """What an attempt's exception means. Raises ``InputError`` for a wrong key or model
    (no retry can fix them) and re-raises anything that is a bug on our side."""
    if isinstance(exc, InputError):
        raise exc
    if isinstance(exc, openai.APITimeoutError):
        return Failure("timeout", True)
    if isinstance(exc, openai.APIConnectionError):
        cause = exc.__cause__ or exc
        return Failure(
            f"connection: {redact(type(cause).__name__ + ': ' + str(cause))[:200]}", True
        )
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        message = redact(str(getattr(exc, "message", "") or exc))[:300]
        if status in (401, 403):
            raise InputError(
                f"{url} refused the request ({status}): check the API key in ${api_key_env}",
                field="api_key_env",
            ) from None
        if status == 404:
            raise InputError(f"{url}: {message}", field="model") from None
        headers = exc.response.headers
        retry = should_retry(headers)
        if retry is None:
            retry = status in (408, 409, 429) or status >= 500
        return Failure(f"http_{status}: {message}", retry, retry_after(headers) if retry else None)
    if isinstance(
        exc,
        json.JSONDecodeError
        | pydantic.ValidationError
        | BadResponse
        | openai.APIResponseValidationError,
    ):
        return Failure(f"bad_response: {redact(str(exc))[:200]}", True)
    raise exc


def should_retry(headers: Mapping[str, str]) -> bool | None:
    """The server's own verdict from ``x-should-retry`` (None: it gives none)."""
    return {"true": True, "false": False}.get(headers.get("x-should-retry", "").strip().lower())


def retry_after(headers: Mapping[str, str], now: datetime | None = None) -> float | None:
    """Seconds the server asks us to wait: ``retry-after-ms``, else ``Retry-After`` as
    seconds or as an HTTP date (RFC 7231, 7.1.3) counted from ``now`` (default: the
    clock). None when there is no readable hint; a date in the past means 0."""
    ms = _non_negative(headers.get("retry-after-ms"))
    if ms is not None:
        return ms / 1000
    value = headers.get("retry-after")
    if value is None:
        return None
    seconds = _non_negative(value)
    if seconds is not None:
        return seconds
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # "-0000": UTC, says RFC 5322
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def _non_negative(value: str | None) -> float | None:
    """A finite number, negatives as 0; None for anything else."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return max(0.0, number) if math.isfinite(number) else None
