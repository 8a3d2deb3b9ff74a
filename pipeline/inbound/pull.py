"""``dx inbound pull ROUTE``: GET a third party's REST endpoint on an interval, page by page.

One *run* reads every page changed since the stored watermark. Per page, in order:

1. GET (rate limited; 5xx, 408, timeouts and connection errors retried with the route's backoff;
   429 and 503 with ``Retry-After`` wait as told without using up attempts; a 401 under OAuth2
   fetches a new token; any other 4xx fails the run with the response in one line);
2. map every record to the route's fields and produce it, waiting for Kafka's acknowledgement;
3. in ONE PostgreSQL transaction: record the page's unmappable records as dead tasks (page,
   item and reason named) and store the cursor (watermark of the run, largest value seen, the
   next page's position).

So a crash (even ``kill -9``) re-reads at most the page whose acknowledgement was not yet
followed by the cursor; its entities are the same events again (deterministic event ids) and
the worker's apply writes nothing for a row it already holds. When the last page is done, the
largest ``incremental.field`` value seen becomes the next run's watermark.

The cursor is JSON in ``dx.inbound_state.cursor``: ``{"since": ..., "max": ..., "next": ...}``
(``next`` is null between runs: a page number, an offset, a token or a URL during one).
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import urljoin

import httpx
import psycopg

from connectors.http.connector import (
    RateLimiter,
    TokenCache,
    auth_headers,
    retry_after_seconds,
)
from pipeline import db
from pipeline.config.auth import OAuth2ClientCredentials
from pipeline.config.inbound import PullConfig
from pipeline.config.model import DxConfig
from pipeline.errors import (
    ConfigError,
    DxError,
    ServiceUnavailable,
    TerminalError,
    TransientError,
)
from pipeline.inbound import state
from pipeline.inbound.entities import Mapper, MappingError, canonical, loads_exact
from pipeline.inbound.produce import InboundProducer, OutMessage, read_route_target
from pipeline.inbound.rejects import rejected
from pipeline.observability.logging import redact
from pipeline.observability.server import WorkerServer
from pipeline.source.events import Failure
from pipeline.source.tasks import recorder
from pipeline.templates import dig

log = logging.getLogger(__name__)


@dataclass
class Cursor:
    since: str | None = None  # the watermark this run asks from
    max: str | None = None  # largest incremental value seen in this run
    next: Any = None  # the next page's position (None: the run is done)

    def dumps(self) -> str:
        return json.dumps({"since": self.since, "max": self.max, "next": self.next})

    @staticmethod
    def loads(text: str | None, initial: str | None) -> Cursor:
        if not text:
            return Cursor(since=initial)
        try:
            d = json.loads(text)
            return Cursor(d.get("since"), d.get("max"), d.get("next"))
        except (ValueError, AttributeError):
            raise TerminalError(f"the stored pull cursor {text[:80]!r} is not readable; start "
                                "again with 'dx inbound pull ROUTE --reset'") from None


@dataclass
class RunStats:
    pages: int = 0
    entities: int = 0
    failed: int = 0
    requests: int = 0
    retries: int = 0
    cursor: str | None = None
    errors: list[str] = field(default_factory=list)


def _origin(url: str) -> tuple[str, str, int | None]:
    u = httpx.URL(url)
    return u.scheme, u.host, u.port or {"http": 80, "https": 443}.get(u.scheme)


def _larger(a: str | None, b: Any, compare: str) -> str | None:
    """The larger of the watermark ``a`` and a record's value ``b`` (text or number order)."""
    if b is None:
        return a
    text = str(b)
    if a is None:
        return text
    if compare == "number":
        try:
            return text if Decimal(text) > Decimal(a) else a
        except InvalidOperation:
            return a
    return text if text > a else a


class Puller:
    """One route's scheduled pull (see module docstring)."""

    def __init__(self, config: DxConfig, route_name: str, *,
                 stop: threading.Event | None = None,
                 on_page: Callable[[int, Cursor], None] | None = None,
                 server: WorkerServer | None = None) -> None:
        self.config = config
        self.server = server if server is not None else WorkerServer(0)
        self.index, self.route, target = read_route_target(config, route_name)
        inbound = self.route.inbound
        if inbound is None or inbound.pull is None:
            file, line = config.where("sources", self.index)
            raise ConfigError(f"route {route_name} has no 'inbound: pull:'", file=file, line=line)
        self.pull: PullConfig = inbound.pull
        self.mapper = Mapper(self.route.name, inbound)
        self.stop = stop or threading.Event()
        self.once = False
        self.on_page = on_page
        self.url = config.database.url.get_secret_value()
        self.origins = {_origin(self.pull.url)}
        if isinstance(self.pull.auth, OAuth2ClientCredentials):
            self.origins.add(_origin(self.pull.auth.token_url))
        self.client = httpx.Client(timeout=httpx.Timeout(self.pull.timeout_s),
                                   follow_redirects=True,
                                   event_hooks={"request": [self._same_origin]},
                                   headers={"User-Agent": "dx-inbound/0.1",
                                            "Accept": "application/json", **self.pull.headers})
        self.tokens = (TokenCache(self.pull.auth, self.client)
                       if isinstance(self.pull.auth, OAuth2ClientCredentials) else None)
        self.limiter = RateLimiter(self.pull.rate_limit_per_s) \
            if self.pull.rate_limit_per_s else None
        self.producer = InboundProducer(config, self.route, target,
                                        ack_timeout_s=self.pull.ack_timeout_s)
        with db.connection(self.url, application_name=f"dx-inbound-pull-{self.route.name}",
                           connect_timeout_s=config.database.connect_timeout_s) as conn:
            state.ensure_schema(conn)

    def close(self) -> None:
        self.producer.close()
        self.client.close()

    def _same_origin(self, request: httpx.Request) -> None:
        """Every request (redirects included) goes to the host of ``pull.url`` (or the OAuth2
        token URL): a ``next`` link or redirect elsewhere would hand that host the route's
        credentials (httpx strips only ``Authorization`` on redirects, not an API key)."""
        if _origin(str(request.url)) not in self.origins:
            raise TerminalError(f"pull {self.route.name}: refusing {request.method} "
                                f"{redact(str(request.url))}: not the host of pull.url (a next "
                                "link or redirect to another host would get the credentials)")

    def reset(self) -> None:
        """Forget the cursor: the next run reads everything again (the same entities are the
        same events; the apply writes nothing for rows it already holds)."""
        with db.connection(self.url, application_name=f"dx-inbound-pull-{self.route.name}",
                           connect_timeout_s=self.config.database.connect_timeout_s) as conn, \
                conn.transaction():
            state.record(conn, self.route.name, "pull", state.Counts(), cursor=None,
                         set_cursor=True)

    # ---- the loop ---------------------------------------------------------------------------

    def run(self, *, once: bool = False) -> RunStats:
        """Runs every ``interval_s`` until stopped; ``once``: one run, raising its failure
        (throttling then has a budget too, ``retry.max_attempts`` throttled answers to one
        request, and waits no longer than ``retry.backoff_max_s``: a target that answers 429
        for ever ends the run with one error line instead of holding it for ever)."""
        self.once = once
        total = RunStats()
        self.server.set_ready(True, "pulling")
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                stats = self.run_once()
            except DxError as err:
                if once:
                    raise
                total.errors.append(str(err))
                log.error("pull %s: %s; next run in %gs", self.route.name, err,
                          self.pull.interval_s)
            else:
                for name in ("pages", "entities", "failed", "requests", "retries"):
                    setattr(total, name, getattr(total, name) + getattr(stats, name))
                total.cursor = stats.cursor
                if once:
                    break
            self._wait(self.pull.interval_s - (time.monotonic() - started))
        self.server.set_ready(False, "stopped")
        return total

    def _wait(self, seconds: float) -> None:
        """Sleep (a stop ends it), beating the /healthz heartbeat every second."""
        deadline = time.monotonic() + seconds
        while not self.stop.is_set():
            self.server.heartbeat()
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self.stop.wait(min(1.0, left))

    def run_once(self) -> RunStats:
        """Every page from the stored cursor on; a failure is recorded and raised."""
        stats = RunStats()
        with db.connection(self.url, application_name=f"dx-inbound-pull-{self.route.name}",
                           connect_timeout_s=self.config.database.connect_timeout_s) as conn:
            inc = self.pull.incremental
            cursor = Cursor.loads(state.load_cursor(conn, self.route.name),
                                  inc.initial if inc else None)
            conn.rollback()
            try:
                self._pages(conn, cursor, stats)
            except psycopg.OperationalError as err:
                raise ServiceUnavailable("postgresql", db.redact(self.url),
                                         str(err).strip()) from None
            except DxError as err:
                conn.rollback()
                if self.stop.is_set():  # stopped mid-run: the cursor says where to go on
                    return stats
                with conn.transaction():
                    state.record(conn, self.route.name, "pull", state.Counts(errors=1),
                                 ok=False, error=str(err))
                raise
        stats.cursor = cursor.dumps()
        return stats

    def _pages(self, conn: psycopg.Connection[Any], cursor: Cursor, stats: RunStats) -> None:
        p = self.pull.pagination
        if cursor.next is None:  # a new run
            cursor.max = cursor.since
            cursor.next = {"page": p.start, "offset": 0}.get(p.kind)
        page_no = 0
        while not self.stop.is_set():
            page_no += 1
            if page_no > self.pull.max_pages:
                raise TerminalError(f"pull {self.route.name}: more than {self.pull.max_pages} "
                                    "pages in one run (raise pull.max_pages?)")
            inc = self.pull.incremental
            keyset = inc is not None and inc.keyset
            # after a resume too (keyset: always the first page, from a moving watermark)
            number = int(cursor.next) if p.kind == "page" and not keyset else page_no
            resp, content = self._get(cursor, stats)
            where = f"{self.route.name} page {number} ({redact(str(resp.url))})"
            try:
                body = loads_exact(content)
            except ValueError:
                raise TerminalError(f"pull {where}: the response is not JSON") from None
            items = dig(body, self.pull.items) if self.pull.items else body
            if not isinstance(items, list):
                raise TerminalError(f"pull {where}: no list at "
                                    f"{self.pull.items or 'the top level'}")
            messages, failures = self._page_messages(items, number, str(resp.url))
            if inc is not None:
                for item in items:
                    if isinstance(item, dict):
                        cursor.max = _larger(cursor.max, dig(item, inc.field), inc.compare)
            self.producer.send(messages)
            nxt = self._next(cursor, body, items, resp)
            if nxt is None:  # the run is complete: the watermark moves on
                cursor.since, cursor.next = cursor.max, None
            elif keyset and cursor.max != cursor.since:  # on from the largest value seen
                cursor.since, cursor.next = cursor.max, {"page": p.start, "offset": 0}[p.kind]
            else:  # (keyset: a page that did not move the watermark pages on as usual)
                cursor.next = nxt
            with conn.transaction():
                recorder().record(conn, self.route.name, failures)
                state.record(conn, self.route.name, "pull",
                             state.Counts(pages=1, entities=len(messages) + len(failures),
                                          errors=len(failures)),
                             cursor=cursor.dumps(), set_cursor=True,
                             ok=True if nxt is None else None)
            if failures:  # refused before Kafka: dead tasks
                self.producer.metrics.failed("terminal", len(failures))
            stats.pages += 1
            stats.entities += len(messages)
            stats.failed += len(failures)
            log.info("pull %s: %d entities, %d unmappable", where, len(messages), len(failures))
            if self.on_page is not None:
                self.on_page(number, cursor)
            if nxt is None:
                return

    def _page_messages(self, items: list[Any], page_no: int, url: str
                       ) -> tuple[list[OutMessage], list[Failure]]:
        messages: list[OutMessage] = []
        failures: list[Failure] = []
        for i, item in enumerate(items):
            provenance: dict[str, str | int] = {"kind": "pull", "page": page_no, "item": i,
                                                "url": redact(url)}
            try:
                if not isinstance(item, dict):
                    raise MappingError(f"expected an object, got {type(item).__name__}")
                record = self.mapper(item)
            except MappingError as err:
                failures.append(rejected(self.route.name, self.route.topic,
                                         canonical(item).encode(), provenance,
                                         f"page {page_no} item {i}: {err}"))
                continue
            messages.append(self.producer.message(record, provenance))
        return messages, failures

    # ---- pagination -------------------------------------------------------------------------

    def _request(self, cursor: Cursor) -> tuple[str, dict[str, Any]]:
        p, inc = self.pull.pagination, self.pull.incremental
        if p.kind == "next" and isinstance(cursor.next, str):
            return cursor.next, {}
        params: dict[str, Any] = dict(self.pull.params)
        if inc is not None and cursor.since is not None:
            params[inc.param] = cursor.since
        if p.size_param:
            params[p.size_param] = p.size
        if p.kind in ("page", "offset") or (p.kind == "cursor" and cursor.next is not None):
            params[p.parameter] = cursor.next
        return self.pull.url, params

    def _next(self, cursor: Cursor, body: Any, items: list[Any], resp: httpx.Response) -> Any:
        p = self.pull.pagination
        if p.kind in ("page", "offset"):
            if not items or (p.size_param and len(items) < p.size):
                return None
            return int(cursor.next) + (1 if p.kind == "page" else len(items))
        if p.kind == "cursor":
            token = dig(body, p.token_path or "")
            return token if token not in (None, "") and items else None
        if p.kind == "next":
            link = dig(body, p.token_path) if p.token_path else \
                resp.links.get("next", {}).get("url")
            return urljoin(str(resp.url), str(link)) if link else None
        return None

    # ---- HTTP -------------------------------------------------------------------------------

    def _fetch(self, url: str, params: dict[str, Any]) -> tuple[httpx.Response, bytes]:
        """GET with its body read in chunks against ``timeout_s`` for the whole request and
        ``max_page_mb`` (a page is never held larger than that; an answer that is not a page,
        a refusal, keeps only its first 64 KiB for the error line)."""
        request = self.client.build_request(
            "GET", url, params=params, headers=auth_headers(self.pull.auth, self.tokens, b""))
        limit = int(self.pull.max_page_mb * 1024 * 1024)
        deadline = time.monotonic() + self.pull.timeout_s
        resp = self.client.send(request, stream=True)
        try:
            ok = 200 <= resp.status_code < 300
            keep = limit + 1 if ok else 64 * 1024
            body = bytearray()
            for chunk in resp.iter_bytes():
                body += chunk[:keep - len(body)]
                if time.monotonic() > deadline:
                    raise httpx.ReadTimeout("whole-request timeout", request=request)
                if len(body) >= keep:
                    if ok:
                        raise TerminalError(
                            f"pull {self.route.name}: GET {redact(str(resp.url))}: the page is "
                            f"larger than pull.max_page_mb ({self.pull.max_page_mb:g} MB); ask "
                            "for smaller pages (pagination.size) or raise the limit")
                    break
        finally:
            resp.close()
        return resp, bytes(body)

    def _get(self, cursor: Cursor, stats: RunStats) -> tuple[httpx.Response, bytes]:
        """One page: its response and body (read in chunks, at most ``max_page_mb``)."""
        url, params = self._request(cursor)
        policy = self.pull.retry
        attempt = throttled = 0
        while True:
            if self.stop.is_set():
                raise TransientError(f"pull {self.route.name}: stopped")
            if self.limiter is not None:
                self.limiter.acquire()
            stats.requests += 1
            self.server.heartbeat()
            wait: float | None = None
            try:
                resp, content = self._fetch(url, params)
            except httpx.HTTPError as err:
                problem = f"{type(err).__name__}: {err}"
            else:
                status = resp.status_code
                if 200 <= status < 300:
                    return resp, content
                text = content.decode(resp.encoding or "utf-8", "replace")
                snippet = " ".join(text.split())[:200]
                problem = f"HTTP {status}: {snippet}"
                retry_after = retry_after_seconds(resp.headers.get("retry-after"))
                if status == 429 or (status == 503 and retry_after is not None):
                    wait = retry_after if retry_after is not None else \
                        policy.delay(max(1, attempt), random.random())  # noqa: S311
                    if self.once and wait > policy.backoff_max_s:
                        raise TransientError(
                            f"pull {self.route.name}: GET {redact(url)}: {problem} (throttled: "
                            f"retry after {wait:g}s, longer than retry.backoff_max_s; --once "
                            "gives up)")
                elif status == 401 and self.tokens is not None:
                    self.tokens.invalidate()
                elif status != 408 and status < 500:
                    raise TerminalError(f"pull {self.route.name}: GET {redact(str(resp.url))}: "
                                        f"{problem}")
            if wait is not None:  # throttled: no attempt used up, but --once has a budget
                throttled += 1
                if self.once and throttled >= policy.max_attempts:
                    raise TransientError(f"pull {self.route.name}: GET {redact(url)}: {problem} "
                                         f"(still throttled after {throttled} requests; --once "
                                         "gives up)")
            else:  # a failed attempt
                attempt += 1
                if attempt >= policy.max_attempts:
                    raise TransientError(f"pull {self.route.name}: GET {redact(url)}: {problem} "
                                         f"(gave up after {attempt} attempts)")
                wait = policy.delay(attempt, random.random())  # noqa: S311
            stats.retries += 1
            log.warning("pull %s: GET %s: %s; again in %.1fs", self.route.name, redact(url),
                        problem, wait)
            self._wait(wait)
