"""HTTP delivery with httpx: one shared, thread-safe client per route.

Failure classes (the worker retries transient ones, dead-letters terminal ones):

============================================  ==========================================
2xx, or a status listed in ``ok_statuses``    delivered
429; 503 with ``Retry-After``                 :class:`Backpressure` (waits, no attempt used)
408, 5xx, timeouts, connection errors         transient
401 with OAuth2 auth                          transient, after dropping the cached token
other 3xx/4xx                                 terminal (the response body is the reason)
============================================  ==========================================
"""

from __future__ import annotations

import base64
import datetime as dt
import email.utils
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

import httpx

from connectors.base import (
    NOT_ATTEMPTED,
    Backpressure,
    LetGo,
    Outcome,
    Record,
    RecordConnector,
    ensure_live,
    key_text,
    still_live,
)
from connectors.http.configuration import HttpSettings
from pipeline.config.auth import (
    ApiKeyAuth,
    BasicAuth,
    BearerAuth,
    HmacAuth,
    OAuth2ClientCredentials,
)
from pipeline.errors import DxError, TerminalError, TransientError
from pipeline.observability.logging import is_secret_name, redact
from pipeline.templates import Part, parse, record_resolver, render

#: every request carries the change's per-key position (see ``Record.position``)
POSITION_HEADER = "Dx-Position"
_CE_VERB = {"c": "created", "u": "updated", "d": "deleted", "r": "read"}


def retry_after_seconds(value: str | None, *, now: float | None = None) -> float | None:
    """``Retry-After`` as seconds: either delta-seconds or an HTTP date (RFC 9110 §10.2.3)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class RateLimiter:
    """A token bucket shared by all lanes of a route (capacity = one second of requests)."""

    def __init__(self, per_second: float) -> None:
        self.rate = per_second
        self.capacity = max(1.0, per_second)
        self.tokens = self.capacity
        self.updated = time.monotonic()
        self.lock = threading.Lock()

    def acquire(self) -> None:
        while True:
            with self.lock:
                now = time.monotonic()
                self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
                self.updated = now
                if self.tokens >= 1:
                    self.tokens -= 1
                    return
                wait = (1 - self.tokens) / self.rate
            time.sleep(wait)


class TokenCache:
    """OAuth2 client-credentials token, fetched lazily, shared by lanes, renewed before expiry."""

    def __init__(self, auth: OAuth2ClientCredentials, client: httpx.Client) -> None:
        self.auth = auth
        self.client = client
        self.lock = threading.Lock()
        self.token: str | None = None
        self.expires_at = 0.0

    def get(self) -> str:
        with self.lock:
            if self.token is not None and time.monotonic() < self.expires_at:
                return self.token
            data = {"grant_type": "client_credentials"}
            if self.auth.scope:
                data["scope"] = self.auth.scope
            if self.auth.audience:
                data["audience"] = self.auth.audience
            try:
                resp = self.client.post(
                    self.auth.token_url, data=data,
                    auth=(self.auth.client_id, self.auth.client_secret.get_secret_value()))
            except httpx.HTTPError as err:
                raise TransientError(f"OAuth2 token endpoint unreachable: "
                                     f"{type(err).__name__}") from None
            if resp.status_code >= 500 or resp.status_code == 429:
                raise TransientError(f"OAuth2 token endpoint answered {resp.status_code}")
            if resp.status_code != 200:
                raise TerminalError(f"OAuth2 token request refused ({resp.status_code}): "
                                    f"{resp.text[:200]}")
            body = resp.json()
            self.token = str(body["access_token"])
            lifetime = float(body.get("expires_in", 3600))
            self.expires_at = time.monotonic() + max(0.0, lifetime - self.auth.refresh_margin_s)
            return self.token

    def invalidate(self) -> None:
        with self.lock:
            self.token = None


def signature(secret: str, algorithm: str, timestamp: str, body: bytes) -> str:
    """Hex HMAC of ``"<timestamp>.<body>"`` (the :class:`HmacAuth` scheme, both directions)."""
    return hmac.new(secret.encode(), timestamp.encode() + b"." + body,
                    getattr(hashlib, algorithm)).hexdigest()


def auth_headers(auth: BearerAuth | BasicAuth | OAuth2ClientCredentials | HmacAuth | ApiKeyAuth
                 | None, tokens: TokenCache | None, body: bytes) -> dict[str, str]:
    """The headers that authenticate one request to a third party (``tokens``: the OAuth2
    token cache when ``auth`` is OAuth2). Shared by sink deliveries and inbound pulls."""
    if auth is None:
        return {}
    if isinstance(auth, BearerAuth):
        return {"Authorization": f"Bearer {auth.token.get_secret_value()}"}
    if isinstance(auth, BasicAuth):
        raw = f"{auth.username}:{auth.password.get_secret_value()}".encode()
        return {"Authorization": "Basic " + base64.b64encode(raw).decode()}
    if isinstance(auth, HmacAuth):
        ts = str(int(time.time()))
        mac = signature(auth.secret.get_secret_value(), auth.algorithm, ts, body)
        return {auth.header: f"t={ts},v1={mac}"}
    if isinstance(auth, ApiKeyAuth):
        return {auth.header: auth.key.get_secret_value()}
    assert tokens is not None
    return {"Authorization": f"Bearer {tokens.get()}"}


class HttpConnector(RecordConnector[HttpSettings]):
    """REST/webhook target. Thread-safe: lanes share the client, limiter and token cache."""

    settings_model = HttpSettings

    def __init__(self, settings: HttpSettings, *, route: str) -> None:
        super().__init__(settings, route=route)
        s = settings
        self.url: list[Part] = parse(s.url)
        self.urls = {op: parse(u) for op, u in s.urls.items()}
        self.client = httpx.Client(
            timeout=httpx.Timeout(s.timeout_s, connect=s.connect_timeout_s),
            limits=httpx.Limits(max_connections=s.max_connections,
                                max_keepalive_connections=s.max_connections),
            verify=s.verify_tls, follow_redirects=False,
            headers={"User-Agent": "dx-sink/0.1", **s.headers})
        self.limiter = RateLimiter(s.rate_limit_per_s) if s.rate_limit_per_s else None
        self.tokens = (TokenCache(s.auth, self.client)
                       if isinstance(s.auth, OAuth2ClientCredentials) else None)

    @property
    def max_batch(self) -> int:
        return self.settings.bulk.max_batch if self.settings.bulk else 1_000

    @property
    def sends_one_at_a_time(self) -> bool:
        return self.settings.bulk is None

    def close(self) -> None:
        self.client.close()

    # -- building requests -------------------------------------------------------------------

    def _body_obj(self, record: Record) -> Any:
        if self.settings.body == "envelope":
            return {"event_id": record.event_id, "op": record.op, "key": record.key,
                    "data": record.payload, "table": record.table, "origin": record.origin,
                    "ts_ms": record.ts_ms}
        return record.payload

    def _auth_headers(self, body: bytes) -> dict[str, str]:
        return auth_headers(self.settings.auth, self.tokens, body)

    def _ce_headers(self, record: Record) -> dict[str, str]:
        ts = (dt.datetime.fromtimestamp(record.ts_ms / 1000, dt.UTC)
              if record.ts_ms else dt.datetime.now(dt.UTC))
        return {
            "ce-specversion": "1.0",
            "ce-id": record.event_id,
            "ce-source": self.settings.ce_source,
            "ce-type": f"{self.settings.ce_type_prefix}.{record.table or record.topic}."
                       f"{_CE_VERB.get(record.op, record.op)}",
            "ce-subject": json.dumps(record.key, sort_keys=True, separators=(",", ":"),
                                     default=str),
            "ce-time": ts.isoformat().replace("+00:00", "Z"),
            **({"ce-dxposition": record.position} if record.position else {}),
        }

    def request_for(self, record: Record) -> httpx.Request:
        s = self.settings
        method = s.methods.get(record.op, s.method)  # type: ignore[call-overload]
        parts = self.urls.get(record.op, self.url)  # type: ignore[call-overload]
        url = render(parts, record_resolver(record), quote=lambda v: quote(v, safe=""))
        body = b"" if method == "DELETE" else json.dumps(
            self._body_obj(record), separators=(",", ":"), default=str).encode()
        headers = {"Content-Type": "application/json"} if body else {}
        if s.idempotency_header:
            headers[s.idempotency_header] = record.event_id
        if record.position:
            headers[POSITION_HEADER] = record.position
        if s.cloudevents:
            headers.update(self._ce_headers(record))
        headers.update(self._auth_headers(body))
        return self.client.build_request(method, url, content=body, headers=headers)

    def bulk_request(self, batch: Sequence[Record]) -> httpx.Request:
        bulk = self.settings.bulk
        assert bulk is not None
        items = [self._body_obj(r) for r in batch]
        obj: Any = {bulk.wrap: items} if bulk.wrap else items
        body = json.dumps(obj, separators=(",", ":"), default=str).encode()
        headers = {"Content-Type": "application/json"}
        if self.settings.idempotency_header:
            # one key for the request: the same for the same events (in any order), so a
            # target that de-duplicates by it sees a retry of the batch as a retry
            ids = sorted(r.event_id for r in batch)
            digest = hashlib.sha256("|".join(ids).encode()).hexdigest()
            headers[self.settings.idempotency_header] = digest[:32]
        headers.update(self._auth_headers(body))
        return self.client.build_request(bulk.method, bulk.url, content=body, headers=headers)

    # -- sending -----------------------------------------------------------------------------

    def _send(self, request: httpx.Request, *, keep_answer: bool = False) -> Outcome:
        """Send one request within ``timeout_s`` for the whole of it: connect, send, the answer
        and its body (read in chunks against the deadline; a target that drips its answer
        times out like one that does not answer). ``keep_answer``: the outcome of a success
        keeps the answer even when successes are not logged (a bulk answer's per-record
        results are read from it)."""
        if self.limiter is not None:
            self.limiter.acquire()
            if not still_live():  # let go of while waiting for the rate limit: not sent
                return Outcome.failed(NOT_ATTEMPTED)
        s = self.settings
        started = time.perf_counter()
        deadline = started + s.timeout_s
        timeouts = httpx.Timeout(s.timeout_s, connect=min(s.connect_timeout_s, s.timeout_s)
                                 ).as_dict()
        request.extensions["timeout"] = timeouts
        request.extensions["trace"] = _WholeRequest(deadline, timeouts)
        chunks: list[bytes] = []
        try:
            resp = self.client.send(request, stream=True)
            try:
                for chunk in resp.iter_bytes():
                    chunks.append(chunk)
                    if time.perf_counter() > deadline:
                        raise httpx.ReadTimeout("whole-request timeout", request=request)
            finally:
                resp.close()
        except LetGo:
            return Outcome.failed(NOT_ATTEMPTED)
        except _Expired:
            return Outcome.failed(TransientError(
                "timeout: no connection within timeout_s (the request was not sent)"),
                request=_describe(request))
        except httpx.TimeoutException as err:
            return Outcome.failed(TransientError(f"timeout: {type(err).__name__}"),
                                  request=_describe(request))
        except httpx.HTTPError as err:
            return Outcome.failed(TransientError(f"connection error: {type(err).__name__}: "
                                                 f"{err}"), request=_describe(request))
        elapsed = (time.perf_counter() - started) * 1000
        text = b"".join(chunks).decode(resp.encoding or "utf-8", "replace")
        error = self.classify(resp.status_code, resp.headers, text)
        if error is None and not self.log_successes and not keep_answer:
            return Outcome(status=resp.status_code, elapsed_ms=elapsed)
        return Outcome(error=error, request=_describe(request), status=resp.status_code,
                       response=text, elapsed_ms=elapsed)

    def classify(self, status: int, headers: httpx.Headers, text: str) -> DxError | None:
        if 200 <= status < 300 or status in self.settings.ok_statuses:
            return None
        snippet = " ".join(text.split())[:300]
        retry_after = retry_after_seconds(headers.get("retry-after"))
        if status == 429 or (status == 503 and retry_after is not None):
            return Backpressure(f"HTTP {status} (throttled, retry after {retry_after}s)",
                                retry_after=retry_after)
        if status == 401 and self.tokens is not None:
            self.tokens.invalidate()
            return TransientError("HTTP 401 (OAuth2 token refused; fetching a new one)")
        if status == 408 or status >= 500:
            return TransientError(f"HTTP {status}: {snippet}")
        return TerminalError(f"HTTP {status}: {snippet}")

    def deliver(self, batch: Sequence[Record]) -> list[Outcome]:
        if self.settings.bulk is not None and len(batch) > 1:
            return self._bulk_by_waves(batch)
        return super().deliver(batch)

    def _bulk_by_waves(self, batch: Sequence[Record]) -> list[Outcome]:
        """Bulk requests that carry at most one record per key: the first record of every key,
        then the second, ... A target reports per-record results after applying the request as
        a whole, so two records of one key in one request could see the later one applied
        while the earlier one failed transiently and is retried after it (a stale overwrite).
        A record whose key failed in an earlier wave is not attempted."""
        waves: list[list[int]] = []
        seen: dict[str, int] = {}
        for i, r in enumerate(batch):
            k = key_text(r.key)
            n = seen.get(k, 0)
            seen[k] = n + 1
            if n == len(waves):
                waves.append([])
            waves[n].append(i)
        out: list[Outcome | None] = [None] * len(batch)
        failed: set[str] = set()
        for wave in waves:
            todo = [i for i in wave if key_text(batch[i].key) not in failed]
            for i in wave:
                if key_text(batch[i].key) in failed:
                    out[i] = Outcome.failed(NOT_ATTEMPTED)
            if not todo:
                continue
            sent = self._bulk([batch[i] for i in todo])
            for i, o in zip(todo, sent, strict=True):
                out[i] = o
                if o.error is not None:
                    failed.add(key_text(batch[i].key))
        return [o if o is not None else Outcome.failed(NOT_ATTEMPTED) for o in out]

    def _bulk(self, batch: Sequence[Record]) -> list[Outcome]:
        """One bulk request (``batch`` holds at most one record per key); per-record outcomes
        where the target reports them (``results``), else, when the target refuses the request
        (a terminal error), halves sent one after the other until the refused records stand
        alone: one bad record does not fail its batch. Terminates: every split halves the
        batch; a record in an accepted half is never sent again."""
        if not still_live():  # the worker let go of these records' partitions
            return [Outcome.failed(NOT_ATTEMPTED)] * len(batch)
        outcome = self._one_request(batch)
        per = self._per_record(outcome, len(batch))
        if per is not None:
            return per
        refused = outcome.error
        if refused is None or refused.transient or len(batch) == 1:
            return [outcome] * len(batch)
        mid = len(batch) // 2
        return self._bulk(batch[:mid]) + self._bulk(batch[mid:])

    def _one_request(self, batch: Sequence[Record]) -> Outcome:
        """One bulk request (its answer kept when per-record results are to be read)."""
        bulk = self.settings.bulk
        try:
            return self._send(self.bulk_request(batch),
                              keep_answer=bulk is not None and bulk.results is not None)
        except DxError as err:
            return Outcome.failed(err)

    def _per_record(self, outcome: Outcome, n: int) -> list[Outcome] | None:
        """Outcomes from the answer's per-record results (``bulk.results``): a list of ``n``
        objects, each with a ``status`` code (classified like a response) or an ``error``."""
        bulk = self.settings.bulk
        if bulk is None or bulk.results is None or outcome.response is None:
            return None
        if outcome.error is not None and outcome.error.transient:
            return None
        try:
            body = json.loads(outcome.response)
            items = body if bulk.results == "." else body.get(bulk.results)
        except (ValueError, AttributeError):
            return None
        if not isinstance(items, list) or len(items) != n:
            return None
        out: list[Outcome] = []
        for item in items:
            text = json.dumps(item, default=str)
            error: DxError | None = None
            if isinstance(item, dict) and isinstance(item.get("status"), int):
                error = self.classify(item["status"], httpx.Headers(), text)
            elif isinstance(item, dict) and item.get("error"):
                error = TerminalError(f"rejected: {' '.join(text.split())[:300]}")
            out.append(Outcome(error=error, request=outcome.request, status=outcome.status,
                               response=text, elapsed_ms=outcome.elapsed_ms))
        return out

    def send(self, record: Record) -> Outcome:
        return self._send(self.request_for(record))


class _Expired(Exception):
    """``timeout_s`` passed before the request went out (waiting for a pooled connection)."""


class _WholeRequest:
    """httpcore's trace hook, called in the sending thread at the start of every phase
    (connect, send the request, receive the answer, ...): each phase may take only what is
    left of ``timeout_s`` (httpx bounds each phase alone: a wait for a pooled connection, a
    connect and a slow answer added up to several times ``timeout_s``, longer than a revoke
    waits), and the request goes on the wire only while the worker still owns its records'
    partitions (checked right before its first byte, after any wait for a connection)."""

    def __init__(self, deadline: float, timeouts: dict[str, float | None]) -> None:
        self.deadline = deadline
        self.timeouts = timeouts

    def __call__(self, event: str, info: dict[str, Any]) -> None:
        if not event.endswith(".started"):
            return
        left = self.deadline - time.perf_counter()
        sending = event.endswith(".send_request_headers.started")
        if sending:
            ensure_live()
        if left <= 0:
            if sending:
                raise _Expired
            left = 0.001  # already on the wire: the next read times out at once
        for phase in ("connect", "read", "write", "pool"):
            self.timeouts[phase] = min(left, self.timeouts.get(phase) or left)


def _describe(request: httpx.Request) -> str:
    """The request for the export log, with credentials masked: the log is shown by
    ``dx tasks show`` and exported to CSV for people without access, so a header like
    ``X-Api-Key`` or a ``user:password@`` / ``?api_key=`` URL must not reach it."""
    lines = [f"{request.method} {redact(str(request.url))}"]
    for name, value in request.headers.items():
        lines.append(f"{name}: {'***' if is_secret_name(name) else value}")
    body = request.content.decode("utf-8", "replace") if request.content else ""
    return "\n".join(lines) + ("\n\n" + body if body else "")
