"""scanner.sources.retry: which failures are retried, not found or final; backoff bounds; the retry loop."""

from __future__ import annotations

import errno

import aiohttp
import pytest
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from scanner.errors import ItemError, ScannerError
from scanner.sources.retry import FAIL, NOT_FOUND, RETRY, RetryPolicy, call_with_retries, classify


def _response_error(status: int, headers=None) -> aiohttp.ClientResponseError:
    url = URL("http://127.0.0.1/a.jpg")
    request = aiohttp.RequestInfo(url, "GET", CIMultiDictProxy(CIMultiDict()), url)
    return aiohttp.ClientResponseError(request_info=request, history=(), status=status, message="x",
                                       headers=headers)


class ReadTimeoutError(Exception):
    """Named like botocore's: classified by name (botocore is not imported by the scanner)."""


def _wrapped(inner: BaseException) -> Exception:
    try:
        try:
            raise inner
        except BaseException as exc:
            raise RuntimeError("backend wrapper") from exc
    except RuntimeError as outer:
        return outer


@pytest.mark.parametrize("exc, verdict", [
    (FileNotFoundError("gone"), NOT_FOUND),
    (OSError(errno.ENOENT, "No such file or directory"), NOT_FOUND),
    (_response_error(404), NOT_FOUND),
    (_response_error(410), NOT_FOUND),
    (_response_error(503), RETRY),
    (_response_error(500), RETRY),
    (_response_error(429), RETRY),
    (_response_error(408), RETRY),
    (_response_error(403), FAIL),
    (_response_error(400), FAIL),
    (ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"), RETRY),
    (ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"), RETRY),
    (TimeoutError(), RETRY),
    (aiohttp.ServerDisconnectedError(), RETRY),
    (aiohttp.ClientPayloadError("Response payload is not completed"), RETRY),
    (OSError(errno.EIO, "Input/output error"), RETRY),
    (OSError(errno.ESTALE, "Stale file handle"), RETRY),
    (PermissionError(errno.EACCES, "Permission denied"), FAIL),
    (ReadTimeoutError("read timed out"), RETRY),
    (_wrapped(ConnectionResetError(errno.ECONNRESET, "reset")), RETRY),
    (_wrapped(FileNotFoundError("gone")), NOT_FOUND),
    (ValueError("bad"), FAIL),
])
def test_classify(exc, verdict):
    assert classify(exc) == verdict


def test_backoff_is_full_jitter_capped_and_honours_retry_after():
    policy = RetryPolicy(base_delay=0.5, max_delay=3.0)
    for attempt, cap in [(0, 0.5), (1, 1.0), (2, 2.0), (3, 3.0), (8, 3.0)]:
        delays = [policy.backoff(attempt) for _ in range(300)]
        assert all(0 <= d <= cap for d in delays)
        assert max(delays) > 0.8 * cap and min(delays) < 0.2 * cap  # spread over the whole range: full jitter
    asked = _response_error(503, headers={"Retry-After": "2"})
    assert all(2.0 <= policy.backoff(0, asked) <= 3.0 for _ in range(50))
    too_long = _response_error(503, headers={"Retry-After": "3600"})
    assert policy.backoff(0, too_long) == 3.0  # capped: one item never waits for an hour


class Flaky:
    """Raises `failures` one per call, then returns "ok"."""

    def __init__(self, *failures: BaseException):
        self.failures = list(failures)
        self.calls = 0

    def __call__(self):
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        return "ok"


def test_transient_failures_are_retried_with_growing_waits():
    slept = []
    attempt = Flaky(_response_error(503), ConnectionResetError(), TimeoutError())
    policy = RetryPolicy(retries=3, base_delay=1.0, max_delay=100.0)
    assert call_with_retries(attempt, policy, "cannot read URL", sleep=slept.append) == "ok"
    assert attempt.calls == 4 and len(slept) == 3
    assert all(0 <= d <= 2 ** n for n, d in enumerate(slept))


def test_retries_are_bounded_in_count_and_time():
    slept = []
    attempt = Flaky(*[_response_error(500)] * 10)
    with pytest.raises(ItemError) as info:
        call_with_retries(attempt, RetryPolicy(retries=2, base_delay=0.0), "cannot read URL", sleep=slept.append)
    assert info.value.kind == "io" and "(after 3 attempts)" in str(info.value) and "500" in str(info.value)
    assert attempt.calls == 3

    attempt = Flaky(*[_response_error(500)] * 10)
    with pytest.raises(ItemError):  # the deadline ends it before the count does: no wait would fit
        call_with_retries(attempt, RetryPolicy(retries=9, base_delay=10.0, max_delay=10.0, deadline=0.0),
                          "cannot read URL", sleep=slept.append)
    assert attempt.calls == 1


def test_permanent_and_final_failures_are_not_retried():
    for exc, kind in [(FileNotFoundError("gone"), "not_found"), (_response_error(403), "io")]:
        attempt = Flaky(exc)
        with pytest.raises(ItemError) as info:
            call_with_retries(attempt, RetryPolicy(retries=5, base_delay=0.0), "cannot read URL")
        assert info.value.kind == kind and attempt.calls == 1
    for passing in (ItemError("too_large", "big"), ScannerError("install it")):
        attempt = Flaky(passing)
        with pytest.raises(type(passing)):
            call_with_retries(attempt, RetryPolicy(retries=5, base_delay=0.0), "cannot read URL")
        assert attempt.calls == 1


def test_policy_validation():
    with pytest.raises(ScannerError, match="--retries"):
        RetryPolicy(retries=-1).validate()
    with pytest.raises(ScannerError, match="--read-timeout"):
        RetryPolicy(read_timeout=0).validate()


def test_base_delay_from_the_environment(monkeypatch):
    monkeypatch.setenv("SCANNER_RETRY_BASE_DELAY", "0.25")
    assert RetryPolicy().base_delay == 0.25
    monkeypatch.delenv("SCANNER_RETRY_BASE_DELAY")
    assert RetryPolicy().base_delay == 0.5
