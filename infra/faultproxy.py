"""HTTP fault-injection proxy on loopback (stdlib only), placed between a client and an S3 server.

    with FaultProxy("http://127.0.0.1:8333") as proxy:
        proxy.add_rule(FaultRule("error500", method="PUT", count=2))      # first 2 PUTs get a 500
        proxy.add_rule(FaultRule("cut", path_regex=r"weights\\.bin", after=1, count=3))
        ... point the S3 client at proxy.url ...
        proxy.summary()                                                    # what was injected

Actions:
  error500       answer 500 InternalError (S3 XML) without forwarding
  drop           read the request, then close the connection with no answer (nothing reached the server)
  cut            forward the headers and only `cut_fraction` of the body, then close both sides
  lose_response  forward everything, the server acts on it, but the client's connection is closed before
                 the answer (the "did my PUT happen?" case that makes retries need to be idempotent)
A rule skips its first `after` matching requests, then fires on the next `count` (-1: forever). Requests
are forwarded verbatim (SigV4 signatures stay valid because the Host header is passed through).
"""

from __future__ import annotations

import http.client
import re
import socketserver
import threading
import time
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Literal
from urllib.parse import urlsplit

Action = Literal["error500", "drop", "cut", "lose_response"]
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "upgrade", "expect"}
_ERROR_XML = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>InternalError</Code>'
    b"<Message>injected by tuneloop faultproxy</Message></Error>"
)


@dataclass
class FaultRule:
    action: Action
    method: str | None = None  # e.g. "PUT"; None matches any
    path_regex: str | None = None  # searched in the request target (path + query)
    after: int = 0  # let this many matching requests through first
    count: int = 1  # then fire this many times; -1 = every time
    cut_fraction: float = 0.5
    matched: int = 0
    fired: int = 0

    def decide(self, method: str, target: str) -> bool:
        """Count a match and say whether to fire; called under the proxy lock."""
        if self.method and self.method.upper() != method.upper():
            return False
        if self.path_regex and not re.search(self.path_regex, target):
            return False
        self.matched += 1
        if self.matched <= self.after or (self.count >= 0 and self.fired >= self.count):
            return False
        self.fired += 1
        return True


@dataclass
class ProxyEvent:
    seq: int
    method: str
    target: str
    action: str  # "forward" or a FaultRule action
    status: int | None  # status returned to the client; None if the connection was closed instead
    body_bytes: int  # request body size the client sent
    forwarded_bytes: int  # request body bytes that reached the server
    t: float = field(default_factory=time.time)


class _Request:
    def __init__(self, method: str, target: str, version: str, headers: list[tuple[str, str]], body: bytes):
        self.method, self.target, self.version, self.headers, self.body = (
            method,
            target,
            version,
            headers,
            body,
        )

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None


def _read_request(rfile: BinaryIO, wfile: BinaryIO) -> _Request | None:
    line = rfile.readline(65537)
    if not line:
        return None
    method, target, version = line.decode("latin-1").rstrip("\r\n").split(" ", 2)
    headers: list[tuple[str, str]] = []
    while True:
        h = rfile.readline(65537)
        if h in (b"\r\n", b"\n", b""):
            break
        k, _, v = h.decode("latin-1").partition(":")
        headers.append((k.strip(), v.strip()))
    req = _Request(method, target, version, headers, b"")
    if (req.header("expect") or "").lower() == "100-continue":
        # Answer at once; otherwise botocore waits a second before sending the body.
        wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        wfile.flush()
    if "chunked" in (req.header("transfer-encoding") or "").lower():
        parts = []
        while True:
            size = int(rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                break
            parts.append(rfile.read(size))
            rfile.readline()
        req.body = b"".join(parts)
        req.headers = [(k, v) for k, v in req.headers if k.lower() != "transfer-encoding"]
        req.headers.append(("Content-Length", str(len(req.body))))
    else:
        want = int(req.header("content-length") or 0)
        req.body = rfile.read(want)
        if len(req.body) < want:  # the client gave up mid-body (e.g. a cancelled sibling part): not a request
            raise ConnectionResetError(f"client sent {len(req.body)} of {want} body bytes")
    return req


class _Handler(socketserver.StreamRequestHandler):
    server: _Server

    def handle(self) -> None:
        self.request.settimeout(60)
        proxy = self.server.proxy
        upstream: http.client.HTTPConnection | None = None
        try:
            while True:
                req = _read_request(self.rfile, self.wfile)
                if req is None:
                    return
                rule = proxy._decide(req.method, req.target)
                action = rule.action if rule else "forward"
                if action == "error500":
                    self._reply(500, [("Content-Type", "application/xml")], _ERROR_XML)
                    proxy._log(req, action, 500, 0)
                    continue
                if action == "drop":
                    proxy._log(req, action, None, 0)
                    return
                if upstream is None:
                    upstream = http.client.HTTPConnection(
                        proxy.upstream_host, proxy.upstream_port, timeout=60
                    )
                if action == "cut":
                    assert rule is not None
                    n = int(len(req.body) * rule.cut_fraction)
                    self._send_upstream(upstream, req, req.body[:n])
                    proxy._log(req, action, None, n)
                    return  # closing both connections mid-body
                self._send_upstream(upstream, req, req.body)
                resp = upstream.getresponse()
                data = resp.read()
                if action == "lose_response":
                    proxy._log(req, action, None, len(req.body))
                    return
                headers = [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP_BY_HOP]
                if resp.chunked or resp.getheader("transfer-encoding"):
                    headers = [
                        (k, v) for k, v in headers if k.lower() not in ("transfer-encoding", "content-length")
                    ]
                    headers.append(("Content-Length", str(len(data))))
                self._reply(resp.status, headers, data, reason=resp.reason, raw_headers=True)
                proxy._log(req, "forward", resp.status, len(req.body))
        except (OSError, ValueError, http.client.HTTPException):
            return  # the client or server went away; nothing more to relay
        finally:
            if upstream is not None:
                upstream.close()

    @staticmethod
    def _send_upstream(conn: http.client.HTTPConnection, req: _Request, body: bytes) -> None:
        conn.putrequest(req.method, req.target, skip_host=True, skip_accept_encoding=True)
        for k, v in req.headers:
            if k.lower() not in _HOP_BY_HOP:
                conn.putheader(k, v)
        conn.endheaders()
        if body:
            conn.send(body)

    def _reply(
        self,
        status: int,
        headers: list[tuple[str, str]],
        body: bytes,
        *,
        reason: str = "",
        raw_headers: bool = False,
    ) -> None:
        lines = [f"HTTP/1.1 {status} {reason or http.client.responses.get(status, '')}"]
        if not raw_headers:
            headers = [*headers, ("Content-Length", str(len(body)))]
        lines += [f"{k}: {v}" for k, v in headers]
        self.wfile.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        self.wfile.flush()


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    proxy: FaultProxy


class FaultProxy:
    """Threaded HTTP proxy on 127.0.0.1 with programmable faults and a log of every request."""

    def __init__(self, upstream_url: str, host: str = "127.0.0.1", port: int = 0) -> None:
        parts = urlsplit(upstream_url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"upstream must be http://host:port, got {upstream_url!r}")
        self.upstream_url = upstream_url
        self.upstream_host: str = parts.hostname
        self.upstream_port: int = parts.port or 80
        self._server = _Server((host, port), _Handler, bind_and_activate=True)
        self._server.proxy = self
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.rules: list[FaultRule] = []
        self.events: list[ProxyEvent] = []

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FaultProxy:
        self._thread = threading.Thread(target=self._server.serve_forever, name="faultproxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def add_rule(self, rule: FaultRule) -> FaultRule:
        with self._lock:
            self.rules.append(rule)
        return rule

    def clear_rules(self) -> None:
        with self._lock:
            self.rules.clear()

    def reset(self) -> None:
        with self._lock:
            self.rules.clear()
            self.events.clear()

    def _decide(self, method: str, target: str) -> FaultRule | None:
        with self._lock:
            for rule in self.rules:
                if rule.decide(method, target):
                    return rule
        return None

    def _log(self, req: _Request, action: str, status: int | None, forwarded: int) -> None:
        with self._lock:
            self.events.append(
                ProxyEvent(
                    len(self.events) + 1, req.method, req.target, action, status, len(req.body), forwarded
                )
            )

    def injected(self) -> list[ProxyEvent]:
        with self._lock:
            return [e for e in self.events if e.action != "forward"]

    def summary(self) -> dict[str, Any]:
        with self._lock:
            events = list(self.events)
        by_action: dict[str, int] = {}
        for e in events:
            by_action[e.action] = by_action.get(e.action, 0) + 1
        return {
            "requests": len(events),
            "by_action": by_action,
            "injected": [
                {"seq": e.seq, "method": e.method, "target": e.target.split("?")[0], "action": e.action,
                 "body_bytes": e.body_bytes, "forwarded_bytes": e.forwarded_bytes}
                for e in events if e.action != "forward"
            ],
        }  # fmt: skip
