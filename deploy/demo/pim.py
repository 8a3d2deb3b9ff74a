"""A small stand-in for a third-party PIM/ERP, for the dx demo exchange.

It plays both directions of the exchange:

* **dx → PIM**: dx's ``pim-products`` sink route delivers product changes here over HTTP
  (``PUT /products/{id}`` with the product JSON, ``DELETE /products/{id}``; ``POST`` works too).
  Every delivery is recorded, answered ``200``, and de-duplicated by its ``Idempotency-Key``
  header: a redelivery (dx retries at-least-once) is answered from the first response and changes
  nothing. A bearer token is checked when one is configured. Like the shop database, the PIM
  keeps the newest ``version`` of a record: a delivery carrying an *older* version than the one
  stored (a shop change that lost the race against an edit made here) is answered ``200`` with
  status ``stale`` and changes nothing, and so is a delivery whose ``Dx-Position`` header is not
  above the last one applied to that record (a request dx timed out on, arriving late after the
  next change of the key); an equal version is taken (the shop wins ties, because
  the shop's inbound route refuses an equal version), so both sides settle on the same row.
* **PIM → dx**: ``POST /products/{id}/edit`` (or ``--edit-every N`` seconds, at random) edits a
  product *in the PIM*, bumps its ``version`` and publishes the row as JSON to an inbound Kafka
  topic (key ``{"id": ...}``, headers ``dx.event_id`` and ``dx.origin: pim``). dx's ``pim-inbound``
  source route applies it to the shop database; dx then does not deliver that change back here
  (loop prevention by origin).

What real PIMs also offer, for dx's inbound kinds (``dx inbound``):

* **Webhooks on edit**: with ``--webhook-url`` every PIM edit is also POSTed there (dx's
  ``POST /inbound/<route>``), signed ``X-Dx-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of
  "t.body">`` with ``--webhook-secret``, with the edit's event id as ``Idempotency-Key``.
* **A changes feed**: ``GET /products?updated_since=<ISO time>&limit=N`` answers
  ``{"data": [...], "next": "<url of the next page>" | null}`` with the products *edited in the
  PIM* after that time (exclusive; each record carries ``changed_at``), oldest first, for
  ``dx inbound pull``; ``next`` asks from the page's last ``changed_at`` (keyset paging: an edit
  while dx pages cannot make it miss a record). ``GET /products`` without
  ``updated_since``/``page`` is the plain list.

Read what happened with ``GET /products``, ``GET /products/{id}``, ``GET /deliveries`` (the last
deliveries) and ``GET /stats`` (counters). Two demo hooks show dx's failure handling: a delivery
whose text contains ``--reject-marker`` (default ``REJECT``) is refused with ``422`` (a terminal
error: dx dead-letters it), and ``--fail-rate`` answers that fraction of deliveries with ``503``
(transient: dx retries with back-off).

Only the standard library is needed for the HTTP side; publishing needs ``confluent-kafka``
(installed with dx). Run::

    python deploy/demo/pim.py --port 8090 --kafka-bootstrap localhost:9092 --topic pim.products

Every flag has an environment twin: PIM_HOST, PIM_PORT, DX_KAFKA_BOOTSTRAP, PIM_TOPIC, PIM_TOKEN,
PIM_EDIT_EVERY, PIM_FAIL_RATE, PIM_REJECT_MARKER, PIM_KEEP_DELIVERIES, PIM_WEBHOOK_URL,
PIM_WEBHOOK_SECRET.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import hmac
import json
import logging
import os
import random
import re
import signal
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections import Counter, OrderedDict, deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

log = logging.getLogger("pim")

#: Fields the PIM publishes back: exactly the columns the demo's inbound route may write.
PUBLISHED_FIELDS = ("id", "sku", "name", "description", "category", "status", "weight_g",
                    "version")
_ITEM = re.compile(r"^/(?P<collection>[a-z][a-z0-9_-]*)/(?P<id>[^/]+)(?P<edit>/edit)?$")
_COLLECTION = re.compile(r"^/(?P<collection>[a-z][a-z0-9_-]*)$")
_ADJECTIVES = ("Recycled", "Limited", "Organic", "Premium", "Everyday", "Signature")
_IDEMPOTENCY_KEYS = 100_000


class Publisher:
    """Publishes PIM edits to the inbound topic; a no-op (with a warning) without Kafka."""

    def __init__(self, bootstrap: str | None, topic: str) -> None:
        self.topic = topic
        self.sent = 0
        self.failed = 0
        self._producer: Any = None
        if bootstrap:
            from confluent_kafka import Producer

            self._producer = Producer({
                "bootstrap.servers": bootstrap,
                "enable.idempotence": True,
                "acks": "all",
                "client.id": "demo-pim",
            })

    @property
    def enabled(self) -> bool:
        return self._producer is not None

    def publish(self, record: dict[str, Any]) -> str:
        """Send one product row; returns its event id. Waits for the acknowledgement (demo
        volumes are tiny and an edit should be in Kafka when the HTTP call returns)."""
        event_id = str(uuid.uuid4())
        if self._producer is None:
            log.warning("no --kafka-bootstrap: edit of product %s not published", record["id"])
            return event_id
        value = {k: record[k] for k in PUBLISHED_FIELDS if k in record}
        self._producer.produce(
            self.topic,
            key=json.dumps({"id": record["id"]}).encode(),
            value=json.dumps(value, default=str).encode(),
            headers=[("dx.event_id", event_id.encode()), ("dx.origin", b"pim")],
            on_delivery=self._delivered,
        )
        self._producer.flush(15)
        return event_id

    def _delivered(self, err: Any, msg: Any) -> None:
        if err is not None:
            self.failed += 1
            log.error("publish to %s failed: %s", self.topic, err)
        else:
            self.sent += 1

    def close(self) -> None:
        if self._producer is not None:
            self._producer.flush(10)


class Notifier:
    """Sends PIM edits as signed webhooks (the scheme dx's ``inbound.webhook.auth: hmac``
    checks); waits for the answer, as a real PIM's webhook dispatcher would."""

    def __init__(self, url: str | None, secret: str | None) -> None:
        self.url = url
        self.secret = (secret or "").encode()
        self.sent = 0
        self.failed = 0

    @property
    def enabled(self) -> bool:
        return self.url is not None

    def send(self, record: dict[str, Any], event_id: str) -> int:
        """POST one product; returns the HTTP status (0 when unreachable)."""
        assert self.url is not None
        body = json.dumps({k: record[k] for k in PUBLISHED_FIELDS if k in record},
                          default=str).encode()
        ts = str(int(time.time()))
        mac = hmac.new(self.secret, ts.encode() + b"." + body, hashlib.sha256).hexdigest()
        req = urllib.request.Request(  # noqa: S310 - the operator's configured dx URL
            self.url, data=body, method="POST", headers={
                "Content-Type": "application/json", "X-Dx-Signature": f"t={ts},v1={mac}",
                "Idempotency-Key": event_id})
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310
                status = int(resp.status)
        except urllib.error.HTTPError as err:
            status = err.code
        except (urllib.error.URLError, OSError) as err:
            log.error("webhook to %s failed: %s", self.url, err)
            status = 0
        if 200 <= status < 300:
            self.sent += 1
        else:
            self.failed += 1
            log.error("webhook for product %s answered %s", record.get("id"), status)
        return status


class Pim:
    """The PIM's state: collections of records by id, delivery log, idempotency responses."""

    def __init__(self, publisher: Publisher, *, token: str | None, fail_rate: float,
                 reject_marker: str | None, keep_deliveries: int = 10_000,
                 notifier: Notifier | None = None) -> None:
        self.publisher = publisher
        self.notifier = notifier or Notifier(None, None)
        self.last_change = ""
        self.token = token
        self.fail_rate = fail_rate
        self.reject_marker = reject_marker
        self.lock = threading.Lock()
        self.collections: dict[str, dict[str, dict[str, Any]]] = {}
        self.deliveries: deque[dict[str, Any]] = deque(maxlen=keep_deliveries)
        self.replies: OrderedDict[str, tuple[int, dict[str, Any]]] = OrderedDict()
        # last ``Dx-Position`` applied per record: a write with a lower one is stale (a request
        # that timed out at dx and arrived after the next change of the same key)
        self.positions: dict[tuple[str, str], str] = {}
        self.stats: Counter[str] = Counter()
        self.started = time.time()

    # -- dx → PIM --------------------------------------------------------------------------

    def deliver(self, method: str, collection: str, item_id: str, body: Any,
                idempotency_key: str | None,
                position: str | None = None) -> tuple[int, dict[str, Any], bool]:
        """Apply one delivery; returns (status, response, replayed)."""
        with self.lock:
            if idempotency_key and idempotency_key in self.replies:
                self.stats["duplicates"] += 1
                status, response = self.replies[idempotency_key]
                self._record(method, collection, item_id, idempotency_key, status, True, body,
                             response)
                return status, response, True
            last = self.positions.get((collection, item_id))
            if position and last is not None and position <= last:
                self.stats["stale"] += 1
                status, response = 200, {"status": "stale", "id": item_id, "position": last}
            else:
                status, response = self._apply(method, collection, item_id, body)
                if position and status < 300:
                    self.positions[(collection, item_id)] = position
            if idempotency_key and status < 500:  # a 503 must be retried for real
                self.replies[idempotency_key] = (status, response)
                while len(self.replies) > _IDEMPOTENCY_KEYS:
                    self.replies.popitem(last=False)
            self._record(method, collection, item_id, idempotency_key, status, False, body,
                         response)
            return status, response, False

    def _apply(self, method: str, collection: str, item_id: str,
               body: Any) -> tuple[int, dict[str, Any]]:
        self.stats["received"] += 1
        self.stats[f"received_{method.lower()}"] += 1
        if self.fail_rate and random.random() < self.fail_rate:  # noqa: S311 - a demo knob
            self.stats["failed_injected"] += 1
            return 503, {"error": "injected outage (--fail-rate), retry later"}
        items = self.collections.setdefault(collection, {})
        if method == "DELETE":
            existed = items.pop(item_id, None) is not None
            self.stats["deleted"] += 1
            return 200, {"status": "deleted" if existed else "absent", "id": item_id}
        if not isinstance(body, dict):
            self.stats["rejected"] += 1
            return 400, {"error": "body must be a JSON object"}
        if self.reject_marker and self.reject_marker in json.dumps(body, default=str):
            self.stats["rejected"] += 1
            return 422, {"error": f"refused: contains {self.reject_marker!r} (demo rule)"}
        record = {**body, "id": body.get("id", _maybe_int(item_id))}
        stored = items.get(item_id)
        if stored is not None and _older(record.get("version"), stored.get("version")):
            self.stats["stale"] += 1
            return 200, {"status": "stale", "id": record["id"], "version": stored.get("version")}
        items[item_id] = record
        self.stats["stored"] += 1
        return 200, {"status": "stored", "id": record["id"], "version": record.get("version")}

    def _record(self, method: str, collection: str, item_id: str, key: str | None,
                status: int, replayed: bool, body: Any, response: dict[str, Any]) -> None:
        fields = body if isinstance(body, dict) else {}
        self.deliveries.append({
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "method": method, "path": f"/{collection}/{item_id}", "idempotency_key": key,
            "status": status, "result": response.get("status"), "replayed": replayed,
            "version": fields.get("version"), "name": fields.get("name"),
        })

    # -- PIM → dx --------------------------------------------------------------------------

    def edit(self, collection: str, item_id: str, changes: dict[str, Any]) -> tuple[int, Any]:
        """A user edits a product in the PIM: apply locally, bump version, publish."""
        with self.lock:
            record = self.collections.get(collection, {}).get(item_id)
            if record is None:
                return 404, {"error": f"{collection}/{item_id} is not in the PIM (yet)"}
            changes = {k: v for k, v in changes.items() if k not in ("id", "version")}
            record.update(changes)
            record["version"] = int(record.get("version") or 0) + 1
            record["changed_at"] = self._change_time()
            snapshot = dict(record)
            self.stats["edits"] += 1
        event_id = self.publisher.publish(snapshot)
        status = "published" if self.publisher.enabled else "not published"
        if self.publisher.enabled:
            log.info("edited %s/%s in the PIM (version %s), published as event %s",
                     collection, item_id, snapshot["version"], event_id)
        if self.notifier.enabled:
            code = self.notifier.send(snapshot, event_id)
            status = f"sent by webhook ({code})"
            log.info("edited %s/%s in the PIM (version %s), webhook answered %s",
                     collection, item_id, snapshot["version"], code)
        return 200, {"status": status, "event_id": event_id, "record": snapshot}

    def _change_time(self) -> str:
        """Strictly increasing (the feed's ``updated_since`` is exclusive); under the lock."""
        now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        if now <= self.last_change:
            last = dt.datetime.strptime(self.last_change, "%Y-%m-%dT%H:%M:%S.%fZ")
            now = (last + dt.timedelta(microseconds=1)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        self.last_change = now
        return now

    def changes(self, collection: str, since: str, page: int, limit: int
                ) -> tuple[list[dict[str, Any]], bool]:
        """Records edited in the PIM after ``since``, oldest first: one page, and whether
        another follows."""
        with self.lock:
            items = [dict(r) for r in self.collections.get(collection, {}).values()
                     if str(r.get("changed_at") or "") > since]
        items.sort(key=lambda r: (str(r["changed_at"]), str(r.get("id"))))
        start = (page - 1) * limit
        return items[start:start + limit], len(items) > start + limit

    def random_edit(self) -> None:
        with self.lock:
            ids = list(self.collections.get("products", {}))
        if not ids:
            return
        item_id = random.choice(ids)  # noqa: S311 - a demo knob
        self.edit("products", item_id, {
            "name": f"{random.choice(_ADJECTIVES)} {self._name(item_id)}",  # noqa: S311
            "description": f"Edited in the PIM at {time.strftime('%H:%M:%S')}.",
        })

    def _name(self, item_id: str) -> str:
        with self.lock:
            name = str(self.collections["products"][item_id].get("name") or "Product")
        words = name.split()
        return " ".join(words[1:] if words and words[0] in _ADJECTIVES else words)

    # -- reads -----------------------------------------------------------------------------

    def listing(self, collection: str, limit: int) -> list[dict[str, Any]]:
        with self.lock:
            items = list(self.collections.get(collection, {}).values())
        items.sort(key=lambda r: (str(type(r.get("id"))), r.get("id")))
        return items[:limit]

    def summary(self) -> dict[str, Any]:
        with self.lock:
            return {
                **{k: self.stats.get(k, 0) for k in (
                    "received", "stored", "stale", "deleted", "duplicates", "rejected",
                    "failed_injected", "edits")},
                "by_method": {k.removeprefix("received_").upper(): v
                              for k, v in self.stats.items() if k.startswith("received_")},
                "records": {name: len(items) for name, items in self.collections.items()},
                "published": self.publisher.sent,
                "publish_failures": self.publisher.failed,
                "webhooks_sent": self.notifier.sent,
                "webhook_failures": self.notifier.failed,
                "last_delivery": self.deliveries[-1] if self.deliveries else None,
                "uptime_s": round(time.time() - self.started, 1),
            }


def _older(incoming: Any, stored: Any) -> bool:
    """Whether a delivered version is older than the stored one (unversioned: never)."""
    try:
        return incoming is not None and stored is not None and int(incoming) < int(stored)
    except (TypeError, ValueError):
        return False


def _maybe_int(text: str) -> int | str:
    return int(text) if text.isdigit() else text


def make_handler(pim: Pim) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "demo-pim"
        sys_version = ""

        def do_GET(self) -> None:
            path, _, query = self.path.partition("?")
            params = dict(p.split("=", 1) for p in query.split("&") if "=" in p)
            limit = int(params.get("limit", "1000")) if params.get("limit", "").isdigit() \
                else 1000
            if path in ("/healthz", "/"):
                self._json(200, {"status": "ok"})
            elif path == "/stats":
                self._json(200, pim.summary())
            elif path == "/deliveries":
                with pim.lock:
                    recent = list(pim.deliveries)[-limit:]
                self._json(200, recent)
            elif (m := _COLLECTION.match(path)) and ("updated_since" in params
                                                      or "page" in params):
                self._changes(m["collection"], params, limit)
            elif m := _COLLECTION.match(path):
                self._json(200, pim.listing(m["collection"], limit))
            elif (m := _ITEM.match(path)) and not m["edit"]:
                with pim.lock:
                    record = pim.collections.get(m["collection"], {}).get(m["id"])
                if record is None:
                    self._json(404, {"error": "not found"})
                else:
                    self._json(200, record)
            else:
                self._json(404, {"error": "not found"})

        def _changes(self, collection: str, params: dict[str, str], limit: int) -> None:
            """``GET /products?updated_since=...&page=N&limit=L`` (see the module doc)."""
            since = urllib.parse.unquote_plus(params.get("updated_since", ""))
            page = int(params["page"]) if params.get("page", "").isdigit() else 1
            items, more = pim.changes(collection, since, max(1, page), max(1, min(limit, 1000)))
            nxt = None
            if more:  # keyset: from the last change on this page (times are unique), so a
                # record edited while dx pages cannot shift another past the pages it read
                nxt = f"/{collection}?" + urllib.parse.urlencode(
                    {"updated_since": items[-1]["changed_at"], "limit": limit})
            self._json(200, {"data": items, "page": page, "next": nxt})

        def do_PUT(self) -> None:
            self._deliver()

        def do_PATCH(self) -> None:
            self._deliver()

        def do_DELETE(self) -> None:
            self._deliver()

        def do_POST(self) -> None:
            path = self.path.partition("?")[0]
            m = _ITEM.match(path)
            if m and m["edit"]:
                body = self._body()
                if not isinstance(body, dict):
                    self._json(400, {"error": "body must be a JSON object of changes"})
                    return
                self._json(*pim.edit(m["collection"], m["id"], body))
                return
            c = _COLLECTION.match(path)
            if c:  # POST /products with the id in the body
                body = self._body()
                item_id = str(body.get("id")) if isinstance(body, dict) and "id" in body else None
                if item_id is None:
                    self._json(400, {"error": "POST to a collection needs an 'id' field"})
                    return
                self._deliver(c["collection"], item_id, body)
                return
            self._deliver()

        def _deliver(self, collection: str | None = None, item_id: str | None = None,
                     body: Any = None) -> None:
            if pim.token and self.headers.get("Authorization") != f"Bearer {pim.token}":
                self._json(401, {"error": "missing or wrong bearer token"})
                return
            if collection is None or item_id is None:
                m = _ITEM.match(self.path.partition("?")[0])
                if not m or m["edit"]:
                    self._json(404, {"error": "deliver to /<collection>/<id>"})
                    return
                collection, item_id = m["collection"], m["id"]
                body = None if self.command == "DELETE" else self._body()
            status, response, replayed = pim.deliver(
                self.command, collection, item_id, body, self.headers.get("Idempotency-Key"),
                self.headers.get("Dx-Position"))
            log.info("%s /%s/%s -> %d %s%s", self.command, collection, item_id, status,
                     response.get("status") or "", " (replayed)" if replayed else "")
            self._json(status, response, replayed=replayed)

        def _body(self) -> Any:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            try:
                return json.loads(raw) if raw else None
            except ValueError:
                return raw.decode("utf-8", errors="replace")

        def _json(self, status: int, body: Any, *, replayed: bool = False) -> None:
            payload = (json.dumps(body, default=str, indent=1) + "\n").encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            if replayed:
                self.send_header("Idempotent-Replayed", "true")
            if status == 503:
                self.send_header("Retry-After", "1")
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("%s %s", self.address_string(), format % args)

    return Handler


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ.get
    p = argparse.ArgumentParser(description="Demo PIM/ERP for the dx exchange.")
    p.add_argument("--host", default=env("PIM_HOST", "127.0.0.1"),
                   help="listen address (0.0.0.0 in a container) [PIM_HOST]")
    p.add_argument("--port", type=int, default=int(env("PIM_PORT", "8090")),
                   help="listen port [PIM_PORT]")
    p.add_argument("--kafka-bootstrap", default=env("DX_KAFKA_BOOTSTRAP"),
                   help="Kafka bootstrap servers for publishing edits [DX_KAFKA_BOOTSTRAP]")
    p.add_argument("--topic", default=env("PIM_TOPIC", "pim.products"),
                   help="inbound topic dx's source route reads [PIM_TOPIC]")
    p.add_argument("--token", default=env("PIM_TOKEN"),
                   help="bearer token deliveries must carry; none = no check [PIM_TOKEN]")
    p.add_argument("--edit-every", type=float, default=float(env("PIM_EDIT_EVERY", "0")),
                   help="seconds between random PIM-side edits; 0 = off [PIM_EDIT_EVERY]")
    p.add_argument("--fail-rate", type=float, default=float(env("PIM_FAIL_RATE", "0")),
                   help="fraction of deliveries answered 503 [PIM_FAIL_RATE]")
    p.add_argument("--reject-marker", default=env("PIM_REJECT_MARKER", "REJECT"),
                   help="deliveries containing this text get 422; '' = off [PIM_REJECT_MARKER]")
    p.add_argument("--keep-deliveries", type=int,
                   default=int(env("PIM_KEEP_DELIVERIES", "10000")),
                   help="how many recent deliveries GET /deliveries remembers "
                        "[PIM_KEEP_DELIVERIES]")
    p.add_argument("--webhook-url", default=env("PIM_WEBHOOK_URL"),
                   help="POST every PIM edit here (dx inbound serve) [PIM_WEBHOOK_URL]")
    p.add_argument("--webhook-secret", default=env("PIM_WEBHOOK_SECRET"),
                   help="HMAC secret signing the webhooks [PIM_WEBHOOK_SECRET]")
    p.add_argument("--log-level", default=env("PIM_LOG_LEVEL", "INFO"))
    args = p.parse_args(argv)
    if not 0 <= args.fail_rate <= 1:
        p.error("--fail-rate must be between 0 and 1")
    return args


def serve(args: argparse.Namespace) -> tuple[ThreadingHTTPServer, Pim]:
    """Build the PIM and bind its server (not yet serving); for tests and main()."""
    publisher = Publisher(args.kafka_bootstrap, args.topic)
    pim = Pim(publisher, token=args.token, fail_rate=args.fail_rate,
              reject_marker=args.reject_marker or None,
              keep_deliveries=max(1, args.keep_deliveries),
              notifier=Notifier(args.webhook_url, args.webhook_secret))
    httpd = ThreadingHTTPServer((args.host, args.port), make_handler(pim))
    httpd.daemon_threads = True
    return httpd, pim


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s pim %(levelname)s %(message)s")
    httpd, pim = serve(args)
    stop = threading.Event()

    def shutdown(*_: object) -> None:
        stop.set()
        threading.Thread(target=httpd.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, shutdown)
    signal.signal(signal.SIGINT, shutdown)
    if args.edit_every > 0:
        def editor() -> None:
            while not stop.wait(args.edit_every):
                try:
                    pim.random_edit()
                except Exception:
                    log.exception("random edit failed")
        threading.Thread(target=editor, name="pim-editor", daemon=True).start()
    host, port = httpd.server_address[:2]
    log.info("demo PIM on http://%s:%s (publishing to %s)", host, port,
             args.topic if pim.publisher.enabled else "nowhere: no --kafka-bootstrap")
    try:
        httpd.serve_forever(poll_interval=0.5)
    finally:
        httpd.server_close()
        pim.publisher.close()


if __name__ == "__main__":
    main()
