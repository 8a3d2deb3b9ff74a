"""``dx inbound serve``: ``POST /inbound/<route>`` receives a third party's webhooks.

Why its own process and not a route of ``dx api serve``: it faces other systems (often from the
internet, behind a different ingress), authenticates them with per-route shared secrets rather
than API keys, needs no database pool on its hot path, and a flood of webhooks must not take
the shop's Data Exchange API down with it (nor an API deploy drop webhooks). Both run the same
way (uvicorn, ``/healthz``), so operators see no difference.

A request, in order: route (404), size from ``Content-Length`` before reading (413), bearer
key (401), body read up to the limit (413), HMAC signature over ``"<t>.<body>"`` with a replay
window, compared in constant time (401), JSON shape (400, the API's coded errors), mapping
(422), idempotency claim (200 for a request already accepted, 409 while an identical one is in
flight), produce and wait for Kafka's acknowledgement (503 when it does not come), 202. A 2xx is
never given for an entity Kafka did not take.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import re
import threading
import time
from dataclasses import dataclass
from typing import Any

import psycopg
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from connectors.http.connector import signature
from pipeline import db
from pipeline.api.errors import ApiError, Problem, fail
from pipeline.api.store import Pool
from pipeline.config.auth import BearerAuth, ReceivedHmac
from pipeline.config.inbound import WebhookConfig
from pipeline.config.model import DxConfig
from pipeline.config.sources import SourceRoute
from pipeline.errors import ConfigError, DxError
from pipeline.inbound import state
from pipeline.inbound.entities import Mapper, MappingError, loads_exact
from pipeline.inbound.produce import InboundProducer, OutMessage, read_route_target
from pipeline.observability.server import WorkerServer

log = logging.getLogger(__name__)

#: A pending claim older than this belongs to a process that died mid-request: take it over.
_STALE_CLAIM_S = 120.0
_PURGE_AFTER_DAYS = 7
#: ASCII digits only: str.isdigit() also accepts digits int() cannot read ("²").
_SECONDS = re.compile(r"[0-9]{1,12}")
_LENGTH = re.compile(r"[0-9]{1,18}")


@dataclass
class Receiver:
    """One route's webhook: its settings, mapping and producer."""

    route: SourceRoute
    hook: WebhookConfig
    mapper: Mapper
    producer: InboundProducer
    counts: state.Counts


def routes_with_webhooks(config: DxConfig) -> list[SourceRoute]:
    found = [r for r in config.sources if r.inbound is not None and r.inbound.webhook]
    if not found:
        raise ConfigError("no source route has 'inbound: webhook:'", file=config.where()[0])
    return found


def _body_items(body: Any) -> list[dict[str, Any]]:
    """One entity, a list, or ``{"data": [...]}``; a problem per bad element."""
    if isinstance(body, dict) and set(body) == {"data"}:
        body, prefix = body["data"], "data"
        if not isinstance(body, list):
            raise fail("bad_body", "'data' must be an array of objects", "data")
    elif isinstance(body, dict):
        return [body]
    else:
        prefix = ""
    if not isinstance(body, list):
        raise fail("bad_body", "expected a JSON object, an array of objects or {\"data\": [...]}")
    if not body:
        raise fail("bad_body", "no entities in the body", prefix or None)
    problems = [Problem("bad_body", "expected an object", f"{prefix}[{i}]")
                for i, item in enumerate(body) if not isinstance(item, dict)]
    if problems:
        raise ApiError(problems[:100])
    return body


def check_signature(auth: ReceivedHmac, header: str | None, body: bytes,
                    now: float | None = None) -> str:
    """``t=<unix seconds>,v1=<hex>`` (several ``v1`` allowed, for secret rotation); returns the
    signed timestamp."""
    if not header:
        raise fail("unauthorized", f"missing {auth.header} header")
    parts = [p.strip().partition("=") for p in header.split(",")]
    ts = next((v for k, _, v in parts if k == "t"), "")
    sigs = [v for k, _, v in parts if k == "v1"]
    if not _SECONDS.fullmatch(ts) or not sigs:
        raise fail("unauthorized", f"{auth.header} must be t=<unix seconds>,v1=<hex signature>")
    if abs((now if now is not None else time.time()) - int(ts)) > auth.tolerance_s:
        raise fail("unauthorized", f"signature timestamp outside the {auth.tolerance_s:g}s "
                                   "window (a replay, or a clock far off)")
    want = signature(auth.secret.get_secret_value(), auth.algorithm, ts, body).encode()
    # bytes: compare_digest refuses a str with non-ASCII characters (a TypeError, not a 401)
    if not any(hmac.compare_digest(want, s.encode("utf-8", "replace")) for s in sigs):
        raise fail("unauthorized", "signature does not match")
    return ts


def stale_claim_s(ack_timeout_s: float) -> float:
    """When a pending claim is taken over: never while its request may still be waiting for
    Kafka (up to the ack timeout plus 5 s), or both would produce and the first, timing out,
    would release the second's claim."""
    return max(_STALE_CLAIM_S, ack_timeout_s + 60)


def check_bearer(auth: BearerAuth, header: str | None) -> None:
    scheme, _, token = (header or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), auth.token.get_secret_value().encode()):
        raise fail("unauthorized", "missing or wrong bearer key")


class WebhookServer:
    """The Starlette application and the per-route receivers."""

    def __init__(self, config: DxConfig, *, flush_s: float = 2.0,
                 server: WorkerServer | None = None) -> None:
        self.config = config
        #: /metrics /healthz /readyz on --metrics-port; the statistics thread beats it
        self.server = server if server is not None else WorkerServer(0)
        self.receivers: dict[str, Receiver] = {}
        url = config.database.url.get_secret_value()
        with db.connection(url, application_name="dx-inbound-serve",
                           connect_timeout_s=config.database.connect_timeout_s) as conn:
            state.ensure_schema(conn)
        try:
            for route in routes_with_webhooks(config):
                _, route, target = read_route_target(config, route.name)
                assert route.inbound is not None and route.inbound.webhook is not None
                hook = route.inbound.webhook
                self.receivers[route.name] = Receiver(
                    route, hook, Mapper(route.name, route.inbound),
                    InboundProducer(config, route, target, ack_timeout_s=hook.ack_timeout_s),
                    state.Counts())
        except BaseException:
            self.close()
            raise
        self.pool = Pool(url, 8, connect_timeout_s=config.database.connect_timeout_s)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._flusher = threading.Thread(target=self._flush_loop, args=(flush_s,),
                                         name="dx-inbound-stats", daemon=True)
        self._flusher.start()
        self.app = Starlette(routes=[
            Route("/inbound/{route}", self.receive, methods=["POST"]),
            Route("/healthz", self.health, methods=["GET"]),
        ], exception_handlers={ApiError: self._api_error,  # type: ignore[dict-item]
                               DxError: self._unavailable, psycopg.Error: self._unavailable})

    def close(self) -> None:
        if hasattr(self, "_stop"):
            self._stop.set()
            self._flusher.join(5)
            try:
                self._flush()
            except (DxError, ApiError, psycopg.Error) as err:
                log.warning("webhook statistics not stored: %s", err)
            self.pool.close()
        for r in self.receivers.values():
            r.producer.close()

    # ---- requests ---------------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "routes": sorted(self.receivers)})

    async def _api_error(self, request: Request, err: ApiError) -> Response:
        name = request.path_params.get("route", "")
        if name in self.receivers:
            with self._lock:
                self.receivers[name].counts.refused += 1
        log.info("webhook %s refused (%d): %s", name, err.status, err)
        return JSONResponse({"errors": [p.to_json() for p in err.problems]},
                            status_code=err.status, headers=err.headers)

    async def _unavailable(self, request: Request, err: Exception) -> Response:
        """The database (idempotency claims) failed: 503, never a 2xx. If Kafka had already
        acknowledged, the sender's retry is a duplicate the apply ignores."""
        log.warning("webhook %s: %s", request.path_params.get("route", ""),
                    str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__)
        return await self._api_error(request, fail(
            "unavailable", "the request could not be confirmed (database unavailable); send it "
            "again: a duplicate is applied once",
            headers={"Retry-After": "5"}))

    async def receive(self, request: Request) -> Response:
        name = request.path_params["route"]
        r = self.receivers.get(name)
        if r is None:
            raise fail("not_found", f"no webhook route {name!r}")
        length = request.headers.get("content-length")
        limit = r.hook.max_body_bytes
        if length is not None and (not _LENGTH.fullmatch(length) or int(length) > limit):
            raise fail("payload_too_large", f"the body is larger than {limit} bytes")
        auth = r.hook.auth
        if isinstance(auth, BearerAuth):
            check_bearer(auth, request.headers.get("authorization"))
        body = await self._read(request, limit)
        replay_key = None
        if isinstance(auth, ReceivedHmac):
            stamp = check_signature(auth, request.headers.get(auth.header), body)
            replay_key = f"signed:{stamp}:{hashlib.sha256(body).hexdigest()}"
        try:
            parsed = loads_exact(body)
        except ValueError as err:  # UnicodeDecodeError is one
            raise fail("bad_body", f"not JSON: {err}") from None
        items = _body_items(parsed)
        if len(items) > r.hook.max_entities:
            raise fail("payload_too_large", f"{len(items)} entities; at most "
                                            f"{r.hook.max_entities} per request")
        given = request.headers.get(r.hook.idempotency_header) if r.hook.idempotency_header \
            else None
        if given is not None and not 0 < len(given) <= 255:
            raise fail("bad_body", f"{r.hook.idempotency_header} must have 1 to 255 characters")
        messages = self._messages(r, items, given)
        fingerprint = hashlib.sha256("\n".join(m.event_id for m in messages).encode()
                                     ).hexdigest()
        # Without a key or id_fields the event ids come from the content, and the same content
        # can be a new edit (A -> B -> A): answering it "duplicate" would drop it. Such a request
        # is identified by its signature instead (a replay inside the window is the same signed
        # request; a new edit is signed anew), and on a bearer route always produced (the apply
        # writes nothing for a row it already holds).
        key = given or (fingerprint if r.mapper.id_fields else replay_key)
        return await self._accept(r, key, fingerprint, messages)

    @staticmethod
    async def _read(request: Request, limit: int) -> bytes:
        """The body, refusing it as soon as it grows past ``limit`` (chunked uploads)."""
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise fail("payload_too_large", f"the body is larger than {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    def _messages(self, r: Receiver, items: list[dict[str, Any]],
                  given_key: str | None) -> list[OutMessage]:
        out: list[OutMessage] = []
        problems: list[Problem] = []
        for i, item in enumerate(items):
            try:
                record = r.mapper(item)
            except MappingError as err:
                problems.append(Problem("invalid_value", str(err), f"[{i}]"))
                continue
            provenance: dict[str, str | int] = {"kind": "webhook", "item": i}
            if given_key:
                provenance["request"] = given_key
            out.append(r.producer.message(record, provenance))
        if problems:
            raise ApiError(problems[:100])
        return out

    async def _accept(self, r: Receiver, key: str | None, fingerprint: str,
                      messages: list[OutMessage]) -> Response:
        route = r.route.name
        claim = "new" if key is None else await run_in_threadpool(
            self._claim, route, key, fingerprint, len(messages),
            stale_claim_s(r.hook.ack_timeout_s))
        if claim == "other":
            raise fail("key_mismatch", f"this {r.hook.idempotency_header} was used before for "
                       "other entities; nothing sent: use a new key for a new request",
                       r.hook.idempotency_header)
        if claim == "accepted":
            with self._lock:
                r.counts.requests += 1
            return JSONResponse({"status": "duplicate", "accepted": 0,
                                 "message": "this request was accepted before; nothing sent"})
        if claim == "pending":
            raise fail("duplicate", "an identical request is being processed; retry shortly",
                       headers={"Retry-After": "1"})
        try:
            # produce() may wait for room in the local queue: not on the event loop
            acked = await run_in_threadpool(r.producer.submit, messages)
            await asyncio.wait_for(asyncio.wrap_future(acked), r.hook.ack_timeout_s + 5)
        except (DxError, TimeoutError) as err:
            if key is not None:
                await run_in_threadpool(self._release, route, key)
            with self._lock:
                r.counts.errors += 1
            log.warning("webhook %s: %s", route, err)
            raise fail("unavailable", "Kafka did not acknowledge the entities; nothing was "
                       "accepted, send again", headers={"Retry-After": "5"}) from None
        if key is not None:
            await run_in_threadpool(self._accepted, route, key)
        with self._lock:
            r.counts.requests += 1
            r.counts.entities += len(messages)
        return JSONResponse({"status": "accepted", "accepted": len(messages),
                             "event_ids": [m.event_id for m in messages]}, status_code=202)

    # ---- idempotency claims -----------------------------------------------------------------

    def _claim(self, route: str, key: str, fingerprint: str, n: int, stale_s: float) -> str:
        """'new' (ours to produce), 'accepted' (done before), 'pending' (in flight) or 'other'
        (the key was used for other entities: answering "duplicate" would drop them)."""
        with self.pool.connection() as conn, conn.transaction():
            row = conn.execute(
                "INSERT INTO dx.inbound_request AS r (route, key, state, entities, fingerprint) "
                "VALUES (%s, %s, 'pending', %s, %s) ON CONFLICT (route, key) DO UPDATE "
                "SET claimed_at = now(), fingerprint = EXCLUDED.fingerprint, "
                "entities = EXCLUDED.entities WHERE r.state = 'pending' "
                "AND r.claimed_at < now() - make_interval(secs => %s) RETURNING state",
                (route, key, n, fingerprint, stale_s)).fetchone()
            if row is not None:
                return "new"
            found = conn.execute("SELECT state, fingerprint FROM dx.inbound_request "
                                 "WHERE route = %s AND key = %s", (route, key)).fetchone()
            if found is None:
                return "pending"
            if found[1] is not None and found[1] != fingerprint:
                return "other"
            return str(found[0])

    def _release(self, route: str, key: str) -> None:
        with self.pool.connection() as conn, conn.transaction():
            conn.execute("DELETE FROM dx.inbound_request WHERE route = %s AND key = %s "
                         "AND state = 'pending'", (route, key))

    def _accepted(self, route: str, key: str) -> None:
        with self.pool.connection() as conn, conn.transaction():
            conn.execute("UPDATE dx.inbound_request SET state = 'accepted' WHERE route = %s "
                         "AND key = %s", (route, key))

    # ---- counters for dx status -------------------------------------------------------------

    def _flush_loop(self, every_s: float) -> None:
        next_purge = 0.0
        while not self._stop.wait(every_s):
            self.server.heartbeat()
            try:
                self._flush()
                if time.monotonic() >= next_purge:
                    with self.pool.connection() as conn, conn.transaction():
                        conn.execute("DELETE FROM dx.inbound_request WHERE claimed_at < "
                                     "now() - make_interval(days => %s)", (_PURGE_AFTER_DAYS,))
                    next_purge = time.monotonic() + 3600
            except (DxError, ApiError, psycopg.Error) as err:
                log.warning("webhook statistics not stored: %s", err)

    def _flush(self) -> None:
        with self._lock:
            pending = [(r.route.name, r.counts) for r in self.receivers.values()
                       if r.counts.any()]
            for r in self.receivers.values():
                r.counts = state.Counts()
        if not pending:
            return
        with self.pool.connection() as conn, conn.transaction():
            for route, counts in pending:
                state.record(conn, route, "webhook", counts,
                             ok=True if counts.requests else None)
