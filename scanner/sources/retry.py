"""Retries for reads that can succeed later, and what a failed read means.

A failed read is one of three things (`classify`):
- NOT_FOUND: the file or URL does not exist (FileNotFoundError, ENOENT, HTTP 404 or 410). Permanent:
  it becomes a `not_found` record at once, without retrying.
- RETRY: the read may work if tried again (HTTP 408, 425, 429 and 5xx, dropped or refused
  connections, timeouts, and the OS's EIO, EAGAIN, ESTALE, ETIMEDOUT, ECONNRESET...). It is tried up
  to `RetryPolicy.retries` more times, with exponential backoff and full jitter (a random wait between
  0 and base * 2^attempt, at most max_delay, or the server's Retry-After when longer), and no new
  attempt starts `deadline` seconds after the first. Still failing: an `io` record, which is
  transient (scanner.errors): the next run tries that id again.
- FAIL: anything else (HTTP 401/403, permission denied...): an `io` record at once, no retries.

Stalls end through the timeouts the sources pass to their clients (`read_timeout`: the longest wait
for a connection or for the next bytes), and a timeout is a RETRY. The default base delay can be
lowered with the environment variable SCANNER_RETRY_BASE_DELAY (seconds), which tests use.
"""

from __future__ import annotations

import asyncio
import errno
import http.client
import itertools
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from scanner.errors import ItemError, ScannerError

T = TypeVar("T")

NOT_FOUND, RETRY, FAIL = "not_found", "retry", "fail"

NOT_FOUND_STATUS = frozenset({404, 410})
RETRY_STATUS = frozenset({408, 425, 429})  # and every 5xx
NOT_FOUND_ERRNOS = frozenset({errno.ENOENT, errno.ENOTDIR})
RETRY_ERRNOS = frozenset(getattr(errno, name) for name in (
    "EIO", "EAGAIN", "EBUSY", "ETIMEDOUT", "ECONNRESET", "ECONNABORTED", "ECONNREFUSED", "EPIPE", "ENETDOWN",
    "ENETUNREACH", "ENETRESET", "EHOSTDOWN", "EHOSTUNREACH", "ESTALE", "ENOLCK") if hasattr(errno, name))
# Exception class names (anywhere in the class's MRO) of clients this module does not import, for the
# failures that may pass: botocore's ReadTimeoutError, EndpointConnectionError, ConnectionClosedError,
# ResponseStreamingError, urllib3's ProtocolError, throttling errors of cloud SDKs...
_RETRY_NAME_PARTS = ("Timeout", "ConnectionClosed", "EndpointConnection", "ConnectionError", "ProtocolError",
                     "IncompleteRead", "ResponseStreamingError", "Throttl", "SlowDown", "ServiceUnavailable")

_rng = random.Random()


def _default_base_delay() -> float:
    value = os.environ.get("SCANNER_RETRY_BASE_DELAY")
    return float(value) if value else 0.5


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try a read (see the module docstring). Picklable: it travels to Ray actors."""

    retries: int = 4  # attempts after the first one
    read_timeout: float = 30.0  # seconds to wait for a connection or for the next bytes
    base_delay: float = field(default_factory=_default_base_delay)
    max_delay: float = 10.0
    deadline: float = 120.0  # no new attempt of one read starts later than this after its first

    def validate(self) -> None:
        if self.retries < 0:
            raise ScannerError(f"--retries is {self.retries}; expected 0 (no retries) or more")
        if not self.read_timeout > 0:
            raise ScannerError(f"--read-timeout is {self.read_timeout}; expected a positive number of seconds")

    def backoff(self, attempt: int, exc: BaseException | None = None) -> float:
        """Seconds to wait before retry number `attempt` + 1 (0-based): full jitter, or the server's
        Retry-After when it asks for longer (capped at max_delay)."""
        delay = _rng.uniform(0, min(self.max_delay, self.base_delay * 2 ** attempt))
        asked = _retry_after(exc) if exc is not None else None
        return max(delay, min(asked, self.max_delay)) if asked is not None else delay


def _chain(exc: BaseException) -> list[BaseException]:
    """`exc` and the exceptions it was raised from (fsspec and SDKs wrap the original failure)."""
    seen: list[BaseException] = []
    while exc is not None and exc not in seen and len(seen) < 8:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    return seen


def _http_status(exc: BaseException) -> int | None:
    """The HTTP status an exception carries: aiohttp's `status`, gcsfs's and urllib's `code`,
    botocore's response metadata."""
    for name in ("status", "code"):  # in this order: aiohttp deprecates `code`
        value = getattr(exc, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and 100 <= value < 600:
            return value
    response = getattr(exc, "response", None)
    if isinstance(response, dict):  # botocore ClientError
        value = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if isinstance(value, int):
            return value
    return None


def _retry_after(exc: BaseException) -> float | None:
    headers = getattr(exc, "headers", None)
    try:
        value = headers.get("Retry-After") if headers is not None else None
        return max(0.0, float(value)) if value is not None else None
    except (AttributeError, TypeError, ValueError):  # an HTTP date, or headers of another shape
        return None


def _aiohttp_retryable(exc: BaseException) -> bool:
    aiohttp = sys.modules.get("aiohttp")  # only ever raised when it is imported
    if aiohttp is None:
        return False
    return isinstance(exc, (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError))


def _classify_one(exc: BaseException) -> str | None:
    if isinstance(exc, FileNotFoundError) or (isinstance(exc, OSError) and exc.errno in NOT_FOUND_ERRNOS):
        return NOT_FOUND
    status = _http_status(exc)
    if status is not None:
        if status in NOT_FOUND_STATUS:
            return NOT_FOUND
        return RETRY if status in RETRY_STATUS or status >= 500 else FAIL
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError, ConnectionError, http.client.IncompleteRead)):
        return RETRY
    if isinstance(exc, OSError) and exc.errno in RETRY_ERRNOS:
        return RETRY
    if _aiohttp_retryable(exc):
        return RETRY
    if any(part in cls.__name__ for cls in type(exc).__mro__ for part in _RETRY_NAME_PARTS):
        return RETRY
    return None


def classify(exc: BaseException) -> str:
    """NOT_FOUND, RETRY or FAIL for a failed read (see the module docstring)."""
    for link in _chain(exc):
        verdict = _classify_one(link)
        if verdict is not None:
            return verdict
    return FAIL


def describe(exc: BaseException) -> str:
    """A short reason: the OS's message for OS errors, else the exception's type and text."""
    if isinstance(exc, OSError) and exc.errno is not None and exc.strerror:
        return exc.strerror
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def call_with_retries(attempt: Callable[[], T], policy: RetryPolicy, action: str,
                      sleep: Callable[[float], None] = time.sleep) -> T:
    """attempt() until it succeeds, retrying RETRY failures as `policy` allows.

    Raises ItemError: `not_found`, or `io` with "{action}: {reason}" (and the number of attempts) once
    retrying is over. ItemError and ScannerError raised by `attempt` pass through unchanged (a
    too_large file, a missing package: trying again would not help).
    """
    start = time.monotonic()
    for n in itertools.count():
        try:
            return attempt()
        except (ItemError, ScannerError):
            raise
        except Exception as exc:  # noqa: BLE001 - fsspec backends and the OS share no base class
            verdict = classify(exc)
            if verdict == NOT_FOUND:
                raise ItemError("not_found", f"{action}: {describe(exc)}") from None
            if verdict == RETRY and n < policy.retries:
                delay = policy.backoff(n, exc)
                if time.monotonic() - start + delay <= policy.deadline:
                    sleep(delay)
                    continue
            tries = f" (after {n + 1} attempts)" if n else ""
            reason = describe(exc)
            if isinstance(exc, (TimeoutError, asyncio.TimeoutError)) and not str(exc):
                reason += f" (nothing received for {policy.read_timeout:g} s)"
            raise ItemError("io", f"{action}{tries}: {reason}") from None
    raise AssertionError("unreachable")
