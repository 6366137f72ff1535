#!/usr/bin/env python3
"""A small client for the increment service, and a command-line demo.

Standard library only (urllib); Python 3.8 or later.

As a library::

    from increment_client import IncrementClient, IncrementError

    client = IncrementClient("http://127.0.0.1:4000")
    client.increment("page:/home", 1)                      # 202: taken
    client.increment("page:/home", 1, wait=True)            # 200: committed
    client.increment_many([("a", 1), ("b", -2)])           # 202: all taken
    try:
        client.increment("x" * 300, 1)
    except IncrementError as error:
        print(error.problem_type, error.detail)            # /problems/invalid-request ...

As a demo (what scripts/examples-test.sh runs)::

    python3 increment_client.py --url http://127.0.0.1:4000 --prefix demo \\
        --keys 3 --count 30 [--batch-size 10 | --wait]

Increment ``i`` (0-based) goes to key ``<prefix>:<i % keys>`` with value
``i + 1``, so the expected totals can be computed without asking the demo.
It logs every retry to stderr and prints one JSON summary on stdout.

Why it retries the way it does (README, "Retrying safely"):

* Every logical request gets one ``Idempotency-Key`` (a random UUID), and
  every retry of that request sends the same key and the same body. The
  service applies a key at most once within its window, on any instance, so
  resending something that may already have been applied cannot count it
  twice. That is what makes retrying an unknown outcome safe; without the
  key, a retry after a lost answer may double the increment.
* No answer (a reset, a timeout, a refused connection) and ``502``/``504``
  mean "unknown": retry with the same key. ``503`` means nothing was taken:
  retry after ``Retry-After`` seconds. ``408`` (body too slow) and ``429``
  are retried as is.
* Any other ``4xx`` is final: resending the same request gets the same
  refusal. Its RFC 9457 problem document (``type``, ``detail``) is raised.
* Retries are bounded by a number of attempts and an overall deadline, and
  spaced by exponential backoff with jitter, so many clients that failed
  together (an instance restarting) do not come back in lockstep.
"""

from __future__ import annotations

import argparse
import email.utils
import http.client
import json
import random
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence, Tuple

# Statuses after which the same request may succeed. 502/504 come from a
# proxy while an instance restarts (the request may or may not have been
# applied: the key makes the retry safe); 503 means nothing was taken.
RETRYABLE_STATUSES = frozenset({408, 429, 502, 503, 504})
# Of those, the ones where the service may have applied the request.
AMBIGUOUS_STATUSES = frozenset({502, 504})


@dataclass
class Accepted:
    """A definite, successful answer."""

    status: int
    """202: taken, written by the next flush; 200 (wait=True): committed."""
    committed: bool
    """True only for 200 to ``increment(..., wait=True)``. A 202 to wait=True
    means taken and held, not yet committed within the service's
    --wait-timeout."""
    accepted: int
    """How many increments the request carried."""
    attempts: int
    idempotency_key: str


class IncrementError(Exception):
    """The request did not get a successful answer.

    ``maybe_applied`` is True when the last attempt got no answer or a
    502/504: the increment may have been applied (at most once, thanks to the
    key). To settle it, resend later with the same ``idempotency_key``.
    """

    def __init__(
        self,
        message: str,
        *,
        status: Optional[int],
        problem_type: Optional[str],
        title: Optional[str],
        detail: Optional[str],
        attempts: int,
        idempotency_key: str,
        maybe_applied: bool,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.problem_type = problem_type
        self.title = title
        self.detail = detail
        self.attempts = attempts
        self.idempotency_key = idempotency_key
        self.maybe_applied = maybe_applied


@dataclass
class _Answer:
    """What one attempt got: an HTTP answer, or `failure` when none came."""

    status: Optional[int] = None
    headers: Optional[http.client.HTTPMessage] = None
    body: bytes = b""
    failure: Optional[str] = None
    # False only when the request certainly never reached the service (the
    # connection was refused): then a failure is not an unknown outcome.
    maybe_sent: bool = True


# on_retry(attempt_that_failed, reason, delay_seconds, from_retry_after)
RetryHook = Callable[[int, str, float, bool], None]


class IncrementClient:
    """Sends increments; retries what is safe to retry, with one key per request.

    ``timeout`` bounds each attempt, ``deadline`` the whole logical request
    including its waits, ``max_attempts`` the number of sends. Backoff starts
    at ``base_delay`` and doubles up to ``max_delay``.
    """

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = 5.0,
        max_attempts: int = 8,
        deadline: float = 30.0,
        base_delay: float = 0.1,
        max_delay: float = 5.0,
        on_retry: Optional[RetryHook] = None,
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.max_attempts = max_attempts
        self.deadline = deadline
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.on_retry = on_retry
        # Let urllib keep its defaults (proxies from the environment), but
        # never follow redirects: a POST must not silently change target.
        self._opener = urllib.request.build_opener(_NoRedirect)

    def increment(
        self,
        key: str,
        value: int,
        *,
        wait: bool = False,
        idempotency_key: Optional[str] = None,
    ) -> Accepted:
        """Adds ``value`` to counter ``key`` (``POST /increment``).

        Raises IncrementError when no successful answer came.
        """
        return self._send("/increment", {"key": key, "value": value}, 1, wait, idempotency_key)

    def increment_many(
        self,
        items: Iterable[Tuple[str, int]],
        *,
        idempotency_key: Optional[str] = None,
    ) -> Accepted:
        """Adds several (key, value) pairs as a whole (``POST /increments``):
        all are applied or none. 1 to 1,000 items. (This route has no
        wait=true: a 202 means taken, written by the next flush.)

        Raises IncrementError when no successful answer came.
        """
        increments = [{"key": key, "value": value} for key, value in items]
        return self._send(
            "/increments", {"increments": increments}, len(increments), False, idempotency_key
        )

    def _send(
        self,
        path: str,
        payload: dict,
        count: int,
        wait: bool,
        idempotency_key: Optional[str],
    ) -> Accepted:
        # One key and one body for the logical request, fixed before the
        # first attempt: a retry must be byte-for-byte the same request, or
        # the service refuses it as a reused key (422) instead of answering
        # it as a repeat.
        key = idempotency_key or str(uuid.uuid4())
        body = json.dumps(payload, separators=(",", ":")).encode()
        url = self.base_url + path + ("?wait=true" if wait else "")
        headers = {
            "Content-Type": "application/json",
            # A structured-field string (RFC 8941), as the IETF draft writes
            # it; the service also takes the bare value.
            "Idempotency-Key": f'"{key}"',
        }
        give_up_at = time.monotonic() + self.deadline
        attempt = 0
        while True:
            attempt += 1
            remaining = give_up_at - time.monotonic()
            answer = self._attempt(url, body, headers, min(self.timeout, max(remaining, 0.001)))

            if answer.status is not None and 200 <= answer.status < 300:
                return Accepted(
                    status=answer.status,
                    committed=answer.status == 200 and wait,
                    accepted=count,
                    attempts=attempt,
                    idempotency_key=key,
                )

            retryable = answer.failure is not None or answer.status in RETRYABLE_STATUSES
            retry_after = _retry_after_seconds(answer.headers)
            if retry_after is not None:
                # A little jitter on top, never below what the service asked.
                delay, from_retry_after = retry_after * (1 + random.uniform(0, 0.1)), True
            else:
                delay, from_retry_after = self._backoff(attempt), False
            out_of_time = time.monotonic() + delay >= give_up_at
            if not retryable or attempt >= self.max_attempts or out_of_time:
                raise self._error(answer, attempt, key, retryable, out_of_time)

            reason = answer.failure or f"HTTP {answer.status}"
            if self.on_retry is not None:
                self.on_retry(attempt, reason, delay, from_retry_after)
            time.sleep(delay)

    def _attempt(self, url: str, body: bytes, headers: dict, timeout: float) -> _Answer:
        request = urllib.request.Request(url, data=body, headers=headers, method="POST")
        try:
            with self._opener.open(request, timeout=timeout) as response:
                return _Answer(response.status, response.headers, response.read())
        except urllib.error.HTTPError as error:
            # A non-2xx answer: urllib raises it, but it is an answer.
            try:
                return _Answer(error.code, error.headers, error.read())
            except (OSError, http.client.HTTPException) as read_error:
                # The status came, the body broke off: still unknown.
                return _Answer(failure=f"HTTP {error.code}, body lost: {read_error!r}")
            finally:
                error.close()
        except urllib.error.URLError as error:
            # Could not connect or send (refused, reset, timeout while sending).
            refused = isinstance(error.reason, ConnectionRefusedError)
            return _Answer(failure=f"no answer: {error.reason!r}", maybe_sent=not refused)
        except (OSError, http.client.HTTPException) as error:
            # Sent, but the answer never came whole: the connection closed
            # (RemoteDisconnected), was reset, or timed out while we waited.
            # The service may have applied the request.
            return _Answer(failure=f"no answer: {error!r}")

    def _backoff(self, attempt: int) -> float:
        # Exponential, capped, with "equal jitter": half the step is fixed so
        # retries never come back at once, half random to spread clients.
        step = min(self.max_delay, self.base_delay * (2 ** (attempt - 1)))
        return step / 2 + random.uniform(0, step / 2)

    @staticmethod
    def _error(
        answer: _Answer, attempts: int, key: str, retryable: bool, out_of_time: bool
    ) -> IncrementError:
        problem = _problem(answer)
        maybe_applied = (answer.failure is not None and answer.maybe_sent) or (
            answer.status in AMBIGUOUS_STATUSES
        )
        if answer.failure is not None:
            what = answer.failure
        else:
            what = f"HTTP {answer.status} {problem.get('type', '')}".rstrip()
            if problem.get("detail"):
                what += f": {problem['detail']}"
        if retryable:
            why = "deadline reached" if out_of_time else f"gave up after {attempts} attempts"
            what = f"{why}; last: {what}"
        if maybe_applied:
            what += f" (may have been applied once; resend with Idempotency-Key {key} to settle)"
        return IncrementError(
            what,
            status=answer.status,
            problem_type=problem.get("type"),
            title=problem.get("title"),
            detail=problem.get("detail"),
            attempts=attempts,
            idempotency_key=key,
            maybe_applied=maybe_applied,
        )


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):  # noqa: D102 - urllib hook
        return None


def _retry_after_seconds(headers: Optional[http.client.HTTPMessage]) -> Optional[float]:
    """Retry-After as seconds: delta-seconds or an HTTP-date (RFC 9110)."""
    if headers is None:
        return None
    value = headers.get("Retry-After")
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None  # unreadable: fall back to backoff
    return max(0.0, when.timestamp() - time.time())


def _problem(answer: _Answer) -> dict:
    """The RFC 9457 problem document of an error answer, or {}."""
    if answer.headers is None or not answer.body:
        return {}
    content_type = answer.headers.get("Content-Type", "")
    if "json" not in content_type:
        return {}
    try:
        document = json.loads(answer.body)
    except ValueError:
        return {}
    return document if isinstance(document, dict) else {}


# --------------------------------------------------------------------------
# The command-line demo.


def _planned(prefix: str, keys: int, count: int) -> Sequence[Tuple[str, int]]:
    return [(f"{prefix}:{i % keys}", i + 1) for i in range(count)]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description="Send increments to an increment service, retrying safely."
    )
    parser.add_argument("--url", default="http://127.0.0.1:4000", help="service base URL")
    parser.add_argument("--prefix", default="demo", help="key prefix (keys are PREFIX:0..K-1)")
    parser.add_argument("--keys", type=int, default=3, help="distinct keys")
    parser.add_argument("--count", type=int, default=10, help="increments to send")
    parser.add_argument(
        "--batch-size", type=int, default=0,
        help="send them with POST /increments, this many per request (default: one POST /increment each)",
    )
    parser.add_argument(
        "--wait", action="store_true",
        help="wait=true: each POST /increment answered 200 once committed (not with --batch-size)",
    )
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds per attempt")
    parser.add_argument("--max-attempts", type=int, default=8, help="sends per logical request")
    parser.add_argument("--deadline", type=float, default=30.0, help="seconds per logical request, waits included")
    args = parser.parse_args(argv)
    if args.keys < 1 or args.count < 1 or args.batch_size < 0 or args.batch_size > 1000:
        parser.error("--keys and --count must be at least 1, --batch-size 0 to 1000")
    if args.wait and args.batch_size:
        parser.error("--wait applies to POST /increment only; POST /increments has no wait=true")

    waits = []

    def log_retry(attempt: int, reason: str, delay: float, from_retry_after: bool) -> None:
        source = "Retry-After" if from_retry_after else "backoff"
        print(f"retry: attempt {attempt} failed ({reason}); waiting {delay:.2f} s ({source})", file=sys.stderr)
        waits.append({"seconds": round(delay, 3), "retry_after": from_retry_after, "reason": reason})

    client = IncrementClient(
        args.url,
        timeout=args.timeout,
        max_attempts=args.max_attempts,
        deadline=args.deadline,
        on_retry=log_retry,
    )
    planned = _planned(args.prefix, args.keys, args.count)
    summary = {"requests": 0, "increments": 0, "attempts": 0, "committed": 0}
    started = time.monotonic()

    def report(error: Optional[IncrementError] = None) -> None:
        summary["elapsed_s"] = round(time.monotonic() - started, 3)
        summary["waits"] = waits
        if error is not None:
            summary["error"] = {
                "status": error.status,
                "type": error.problem_type,
                "detail": error.detail,
                "attempts": error.attempts,
                "maybe_applied": error.maybe_applied,
            }
        print(json.dumps(summary))

    try:
        if args.batch_size:
            chunks = [planned[i:i + args.batch_size] for i in range(0, len(planned), args.batch_size)]
            for chunk in chunks:
                answer = client.increment_many(chunk)
                summary["attempts"] += answer.attempts
                summary["requests"] += 1
                summary["increments"] += answer.accepted
                summary["committed"] += answer.committed
        else:
            for key, value in planned:
                answer = client.increment(key, value, wait=args.wait)
                summary["attempts"] += answer.attempts
                summary["requests"] += 1
                summary["increments"] += answer.accepted
                summary["committed"] += answer.committed
    except IncrementError as error:
        summary["attempts"] += error.attempts
        print(f"error: {error}", file=sys.stderr)
        if error.problem_type:
            print(f"problem type: {error.problem_type}", file=sys.stderr)
            print(f"problem detail: {error.detail}", file=sys.stderr)
        report(error)
        return 1
    report()
    return 0


if __name__ == "__main__":
    sys.exit(main())
