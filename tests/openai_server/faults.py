"""Fault injection for the local test server: a seeded schedule and an ASGI middleware.

Each API call gets an arrival number ``n``; whether call ``n`` fails, and how, depends only
on ``(seed, n)``, so a run with the same traffic sees the same faults. A retried request
arrives again with a new number and usually goes through.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Any

FAULT_KINDS = ("rate_limit", "server_error", "drop", "slow", "truncate")
FAULTED_PATHS = ("/v1/completions", "/v1/chat/completions")


@dataclass
class FaultSchedule:
    """Fractions of API calls that fail in each way (the rest are served normally).

    - ``rate_limit``: 429 with ``Retry-After`` / ``retry-after-ms`` headers (with
      ``retry_after_date``: only ``Retry-After``, as an HTTP date ``retry_after_s`` ahead,
      rounded up to the second);
    - ``server_error``: ``error_status`` (500) with an error body;
    - ``drop``: status line and headers sent, then the connection closes mid-body;
    - ``slow``: the answer comes ``slow_s`` seconds late (set it past the client's timeout);
    - ``truncate``: 200 whose JSON body is cut in half.

    With ``should_retry`` set, rate limits and server errors carry ``x-should-retry``.
    """

    rate_limit: float = 0.0
    server_error: float = 0.0
    drop: float = 0.0
    slow: float = 0.0
    truncate: float = 0.0
    seed: int = 0
    slow_s: float = 3.0
    retry_after_s: float = 0.05
    retry_after_date: bool = False
    error_status: int = 500
    should_retry: bool | None = None

    def __post_init__(self) -> None:
        total = sum(getattr(self, k) for k in FAULT_KINDS)
        if any(getattr(self, k) < 0 for k in FAULT_KINDS) or total > 1:
            raise ValueError("fault fractions must be >= 0 and sum to at most 1")

    @classmethod
    def uniform(cls, total: float, *, seed: int = 0, **settings: float) -> FaultSchedule:
        """``total`` split evenly over the five kinds."""
        share = total / len(FAULT_KINDS)
        return cls(**{k: share for k in FAULT_KINDS}, seed=seed, **settings)

    def pick(self, n: int) -> str | None:
        """The fault for arrival ``n`` (None: serve it)."""
        u = random.Random(f"{self.seed}:{n}").random()
        edge = 0.0
        for kind in FAULT_KINDS:
            edge += getattr(self, kind)
            if u < edge:
                return kind
        return None


@dataclass
class TrafficLog:
    """What the server saw: arrivals and injected faults (thread-safe counters)."""

    calls: int = 0
    served: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def arrive(self) -> int:
        with self._lock:
            n = self.calls
            self.calls += 1
            return n

    def count(self, what: str) -> None:
        with self._lock:
            if what == "served":
                self.served += 1
            else:
                self.faults[what] += 1


class FaultMiddleware:
    """Wraps the API app; injects the scheduled fault before (or instead of) serving."""

    def __init__(self, app: Any, schedule: FaultSchedule | None, log: TrafficLog) -> None:
        self.app, self.schedule, self.log = app, schedule, log

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] not in FAULTED_PATHS:
            await self.app(scope, receive, send)
            return
        n = self.log.arrive()
        kind = self.schedule.pick(n) if self.schedule else None
        if kind is not None:
            self.log.count(kind)
        if kind == "rate_limit":
            headers = _retry_after(self.schedule) + _should_retry(self.schedule)
            await _json(send, 429, _error("rate limit reached, slow down", "rate_limit"), headers)
        elif kind == "server_error":
            error = _error("injected server error", "server_error")
            await _json(send, self.schedule.error_status, error, _should_retry(self.schedule))
        elif kind == "drop":
            # Headers promise a body that never fully arrives; returning early makes
            # uvicorn close the connection mid-response.
            await send(_start(200, [(b"content-length", b"4096")]))
            await send({"type": "http.response.body", "body": b'{"id": "cmpl-', "more_body": True})
        elif kind == "truncate":
            await self._truncated(scope, receive, send)
        else:
            if kind == "slow":
                await asyncio.sleep(self.schedule.slow_s)
            await self.app(scope, receive, send)
        if kind is None:
            self.log.count("served")

    async def _truncated(self, scope: dict, receive: Any, send: Any) -> None:
        """Serve the call for real, then send only the first half of its JSON body."""
        start: dict = {}
        body = bytearray()

        async def capture(message: dict) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
            elif message["type"] == "http.response.body":
                body.extend(message.get("body", b""))

        await self.app(scope, receive, capture)
        cut = bytes(body[: max(1, len(body) // 2)])
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(cut)).encode()))
        await send(_start(start.get("status", 200), headers))
        await send({"type": "http.response.body", "body": cut})


def _retry_after(schedule: FaultSchedule) -> list[tuple[bytes, bytes]]:
    wait = schedule.retry_after_s
    if schedule.retry_after_date:
        return [(b"retry-after", formatdate(math.ceil(time.time() + wait), usegmt=True).encode())]
    return [
        (b"retry-after", str(max(1, math.ceil(wait))).encode()),
        (b"retry-after-ms", str(int(wait * 1000)).encode()),
    ]


def _should_retry(schedule: FaultSchedule) -> list[tuple[bytes, bytes]]:
    if schedule.should_retry is None:
        return []
    return [(b"x-should-retry", b"true" if schedule.should_retry else b"false")]


def _error(message: str, kind: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "code": None, "param": None}}


def _start(status: int, headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    return {"type": "http.response.start", "status": status, "headers": headers}


async def _json(
    send: Any, status: int, payload: dict, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    body = json.dumps(payload).encode()
    all_headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *(headers or []),
    ]
    await send(_start(status, all_headers))
    await send({"type": "http.response.body", "body": body})
