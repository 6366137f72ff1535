#!/usr/bin/env python3
"""An HTTP/1.1 proxy that injects faults per Idempotency-Key, for
scripts/examples-test.sh.

Faults apply to POST requests, counted per request: the same path and the
same body are the same request, whatever its Idempotency-Key says. So every
logical request of a client meets them on its first attempts and its retries
get through — and a client that changed or dropped its key on a retry would
have its increment applied twice, which the database check then shows.

  --drop-answers N    the first N attempts of each request are forwarded to
                      the service, but the proxy closes the client
                      connection instead of returning the answer (the
                      request was applied; the client cannot know it)
  --answer-status S   the first --answer-times attempts of each request are
                      answered by the proxy with status S and a problem
                      document, not forwarded (with --retry-after SECONDS:
                      and that header)

Everything else is forwarded unchanged (one upstream connection per request).
GET /__proxy/stats answers what happened so far, as JSON.

Prints "listening 127.0.0.1:PORT" on stdout once it accepts connections.
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# Headers that belong to one connection, not to the request (RFC 9110 7.6.1);
# Content-Length is recomputed from the body read whole.
HOP_BY_HOP = {
    "connection", "keep-alive", "proxy-connection", "transfer-encoding", "te",
    "trailer", "upgrade", "content-length", "host",
}
UPSTREAM_TIMEOUT_SECONDS = 30


class Faults:
    """Attempts per request and what was done; shared by the handler threads."""

    def __init__(self, drop_answers: int, answer_status: int, answer_times: int, retry_after: str | None):
        self.drop_answers = drop_answers
        self.answer_status = answer_status
        self.answer_times = answer_times if answer_status else 0
        self.retry_after = retry_after
        self._lock = threading.Lock()
        self._attempts: Counter[bytes] = Counter()
        # The Idempotency-Keys each request was sent with (a correct client
        # sends one per request, on every attempt).
        self._keys: dict[bytes, set] = {}
        self.stats = {
            "forwarded": 0,
            "dropped": 0,
            "dropped_upstream_statuses": Counter(),
            "answered_by_proxy": 0,
            "keyless_posts": 0,
        }

    def decide(self, request: bytes, idempotency_key: str | None) -> str:
        """'answer' (the proxy answers), 'drop' (forward, then hang up) or 'forward'."""
        with self._lock:
            if idempotency_key is None:
                self.stats["keyless_posts"] += 1
            self._keys.setdefault(request, set()).add(idempotency_key)
            self._attempts[request] += 1
            attempt = self._attempts[request]
            if attempt <= self.answer_times:
                self.stats["answered_by_proxy"] += 1
                return "answer"
            if attempt <= self.answer_times + self.drop_answers:
                return "drop"
            return "forward"

    def count(self, name: str, upstream_status: int | None = None) -> None:
        with self._lock:
            self.stats[name] += 1
            if upstream_status is not None:
                self.stats["dropped_upstream_statuses"][str(upstream_status)] += 1

    def snapshot(self) -> dict:
        with self._lock:
            attempts = list(self._attempts.values())
            return {
                **{k: dict(v) if isinstance(v, Counter) else v for k, v in self.stats.items()},
                "requests": len(attempts),
                "max_attempts_per_request": max(attempts, default=0),
                "requests_with_several_keys": sum(1 for keys in self._keys.values() if len(keys) > 1),
            }


def make_handler(upstream: str, faults: Faults):
    class Handler(BaseHTTPRequestHandler):
        # HTTP/1.1 so that keep-alive clients (Node's fetch) reuse connections.
        protocol_version = "HTTP/1.1"

        def log_message(self, format, *args):  # noqa: A002 - BaseHTTPRequestHandler's name
            sys.stderr.write("fault_proxy: " + (format % args) + "\n")

        def do_GET(self):
            if self.path == "/__proxy/stats":
                self._reply(200, {"Content-Type": "application/json"}, json.dumps(faults.snapshot()).encode())
            else:
                self._forward(self._read_body())

        def do_POST(self):
            body = self._read_body()
            action = faults.decide(
                self.path.encode() + b"\n" + body, self.headers.get("Idempotency-Key")
            )
            if action == "answer":
                headers = {"Content-Type": "application/problem+json"}
                if faults.retry_after is not None:
                    headers["Retry-After"] = faults.retry_after
                problem = {
                    "type": "/problems/injected-by-proxy",
                    "title": "Injected by fault_proxy",
                    "status": faults.answer_status,
                    "detail": "fault_proxy answered instead of the service; nothing was forwarded",
                }
                self._reply(faults.answer_status, headers, json.dumps(problem).encode())
            elif action == "drop":
                status, _, _ = self._exchange(body)
                faults.count("dropped", status)
                # Hang up without a byte of the answer: the client sees the
                # connection close after its request was applied.
                self.close_connection = True
            else:
                self._forward(body)

        def _read_body(self) -> bytes:
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def _exchange(self, body: bytes):
            connection = http.client.HTTPConnection(upstream, timeout=UPSTREAM_TIMEOUT_SECONDS)
            try:
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                connection.request(self.command, self.path, body=body, headers=headers)
                response = connection.getresponse()
                return response.status, response.getheaders(), response.read()
            finally:
                connection.close()

        def _forward(self, body: bytes) -> None:
            try:
                status, headers, answer = self._exchange(body)
            except OSError as error:
                self._reply(502, {"Content-Type": "text/plain"}, f"upstream: {error}\n".encode())
                return
            faults.count("forwarded")
            self._reply(status, {k: v for k, v in headers if k.lower() not in HOP_BY_HOP}, answer)

        def _reply(self, status: int, headers: dict, body: bytes) -> None:
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", required=True, help="HOST:PORT of the service")
    parser.add_argument("--listen-port", type=int, default=0, help="loopback port (0: any free one)")
    parser.add_argument("--drop-answers", type=int, default=0)
    parser.add_argument("--answer-status", type=int, default=0)
    parser.add_argument("--answer-times", type=int, default=1)
    parser.add_argument("--retry-after", default=None, help="Retry-After value sent with --answer-status")
    args = parser.parse_args()

    faults = Faults(args.drop_answers, args.answer_status, args.answer_times, args.retry_after)
    server = ThreadingHTTPServer(("127.0.0.1", args.listen_port), make_handler(args.upstream, faults))
    server.daemon_threads = True
    host, port = server.server_address[:2]
    print(f"listening {host}:{port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
