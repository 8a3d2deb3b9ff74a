"""Scheduled pulls against a real paginated HTTP endpoint: every entity applied exactly once
across kill -9 of the puller between pages; the next run asks only for what changed; 5xx and 429
storms are waited out; a bad entity becomes a dead task naming its page and field."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from pipeline.config.loader import load_config
from pipeline.errors import TerminalError
from pipeline.inbound.pull import Puller
from pipeline.observability.server import WorkerServer
from tests.integration.test_inbound_support import (
    ThirdParty,
    free_port,
    inbound_config,
    products_table,
    rows,
    wait_for,
    writes,
)
from tests.integration.test_source_support import run_worker

pytestmark = pytest.mark.integration

PULL = """      id_fields: [id, seq]
      mapping:
        fields:
          id: id
          sku: code
          name: title
          price: {{from: attributes.price, type: decimal}}
          seq: seq
      pull:
        url: {url}/products
        items: data
        pagination: {{kind: page, size_param: limit, size: 10}}
        incremental: {{param: updated_since, field: seq, compare: number}}
        retry: {{max_attempts: 6, backoff_base_s: 0.01, backoff_max_s: 0.05}}
        interval_s: 0.2
"""


ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}


def pull_once(config: Any) -> Any:
    """One run of the route's puller in this process (its RunStats)."""
    puller = Puller(config, "products")
    try:
        return puller.run(once=True)
    finally:
        puller.close()


def dx_pull(cfg: Path) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", "inbound", "pull", "products", "--once",
            "-c", str(cfg)]


def failed_pull(cfg: Path) -> list[str]:
    """``dx inbound pull --once`` that must fail: its stderr lines."""
    done = subprocess.run(dx_pull(cfg), capture_output=True, text=True, timeout=120, env=ENV)
    assert done.returncode == 1
    return done.stderr.strip().splitlines()


OAUTH = """        auth: {{kind: oauth2, token_url: "{url}/token", client_id: dx,
               client_secret: "${{DX_TEST_PULL_SECRET}}"}}
"""


class Catalog:
    """The third party: products with a change sequence, ``GET /products?updated_since=S
    &page=P&limit=L`` (changes after S, oldest first). ``failures[page]`` answers that many
    requests of a page with the listed statuses first; ``slow_from`` delays later pages."""

    def __init__(self, n: int) -> None:
        self.lock = threading.Lock()
        self.seq = 0
        self.items: dict[int, dict[str, Any]] = {}
        for i in range(1, n + 1):
            self.change(i, f"product {i}", f"{i}.50")
        self.failures: dict[int, list[int]] = {}
        self.slow_from: int | None = None
        self.oauth_secret: str | None = None  # set: /token issues tokens, pages require one
        self.tokens: list[str] = []
        self.refuse_first_token = False
        self.server = ThirdParty(self.handle)

    def change(self, i: int, title: str, price: str) -> None:
        with self.lock:
            self.seq += 1
            self.items[i] = {"id": i, "code": f"sku-{i}", "title": title,
                             "attributes": {"price": price}, "seq": self.seq}

    def handle(self, method: str, path: str, query: dict[str, str], headers: dict[str, str],
               body: bytes) -> tuple[int, dict[str, str], Any]:
        if self.oauth_secret is not None:
            refused = self._oauth(path, headers, body)
            if refused is not None:
                return refused
        page, limit = int(query.get("page", 1)), int(query.get("limit", 10))
        with self.lock:
            pending = self.failures.get(page)
            if pending:
                status = pending.pop(0)
                return status, ({"Retry-After": "0"} if status == 429 else {}), {"error": "x"}
            since = int(query.get("updated_since", 0))
            changed = sorted((x for x in self.items.values() if x["seq"] > since),
                             key=lambda x: x["seq"])
        if self.slow_from is not None and page >= self.slow_from:
            threading.Event().wait(0.5)
        return 200, {}, {"data": changed[(page - 1) * limit:page * limit], "page": page}

    def _oauth(self, path: str, headers: dict[str, str], body: bytes
               ) -> tuple[int, dict[str, str], Any] | None:
        """Client credentials at /token (HTTP basic, form body); bearer tokens on pages."""
        if path == "/token":
            basic = base64.b64encode(f"dx:{self.oauth_secret}".encode()).decode()
            if headers.get("Authorization") != f"Basic {basic}" or \
                    b"grant_type=client_credentials" not in body:
                return 401, {}, {"error": "invalid_client"}
            self.tokens.append(f"tok-{len(self.tokens) + 1}")
            return 200, {}, {"access_token": self.tokens[-1], "expires_in": 3600}
        token = headers.get("Authorization", "").removeprefix("Bearer ")
        if token not in self.tokens or (self.refuse_first_token and token == "tok-1"):
            return 401, {}, {"error": "invalid_token"}
        return None

    def pages_requested(self) -> Counter[tuple[str, str]]:
        return Counter((q.get("updated_since", ""), q.get("page", ""))
                       for _, _, q in self.server.requests)


def pull_state(db_url: str) -> tuple[int, str | None]:
    with psycopg.connect(db_url) as conn:
        if conn.execute("SELECT to_regclass('dx.inbound_state')").fetchone() == (None,):
            return 0, None
        row = conn.execute("SELECT pages, cursor FROM dx.inbound_state WHERE route = 'products' "
                           "AND kind = 'pull'").fetchone()
    return (0, None) if row is None else (int(row[0]), row[1])


def test_paged_pull_survives_kill_9_applies_once_and_then_only_changes(
        tmp_path: Path, stack: Any, pg_db: str, topic_prefix: str) -> None:
    products_table(pg_db)
    catalog = Catalog(50)
    try:
        cfg = inbound_config(tmp_path, stack, pg_db, f"{topic_prefix}.pim.products",
                             PULL.format(url=catalog.server.url))
        catalog.slow_from = 3
        proc = subprocess.Popen(dx_pull(cfg), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, env=ENV)
        wait_for("two pages stored", lambda: pull_state(pg_db)[0] >= 2 or proc.poll() is not None)
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
        _, cursor = pull_state(pg_db)
        assert cursor is not None and json.loads(cursor)["next"] is not None  # mid-run
        catalog.slow_from = None

        config = load_config(cfg)
        stats = pull_once(config)
        assert stats.pages >= 1
        # at most the page in flight at the kill was read twice; every other page once
        counts = catalog.pages_requested()
        assert all(n <= 2 for n in counts.values()), counts
        assert sum(1 for n in counts.values() if n == 2) <= 1, counts
        assert json.loads(pull_state(pg_db)[1] or "{}") == {"since": "50", "max": "50",
                                                            "next": None}

        run_worker(cfg, "products")
        assert len(rows(pg_db)) == 50
        assert set(writes(pg_db).values()) == {1}  # every entity written exactly once
        assert rows(pg_db)[7] == ("sku-7", "product 7", pytest.approx(7.5), 7)

        # the next run asks from the watermark and gets only what changed
        for i in (3, 7, 42):
            catalog.change(i, f"renamed {i}", f"{i}.75")
        catalog.server.requests.clear()
        stats = pull_once(config)
        assert stats.entities == 3
        assert {q.get("updated_since") for _, _, q in catalog.server.requests} == {"50"}
        run_worker(cfg, "products")
        w = writes(pg_db)
        assert {i for i, n in w.items() if n == 2} == {3, 7, 42}
        assert set(w.values()) <= {1, 2}
        assert rows(pg_db)[42][1:] == ("renamed 42", pytest.approx(42.75), 53)

        # --reset reads everything again: the same events, and the apply writes nothing
        puller = Puller(config, "products")
        puller.reset()
        puller.close()
        assert pull_once(config).entities == 50
        run_worker(cfg, "products")
        assert writes(pg_db) == w
    finally:
        catalog.server.close()


def test_pull_waits_out_5xx_and_429_storms_and_bad_entities_become_dead_tasks(
        tmp_path: Path, stack: Any, pg_db: str, topic_prefix: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Also OAuth2 client credentials: a token refused once (401) is fetched again."""
    products_table(pg_db)
    monkeypatch.setenv("DX_TEST_PULL_SECRET", "pull-secret")
    catalog = Catalog(25)
    catalog.oauth_secret, catalog.refuse_first_token = "pull-secret", True
    catalog.change(14, "n" * 41, "14.00")  # page 2 of 3: too long for varchar(40)
    catalog.change(15, "product 15", "not a price")  # page 2: the mapping cannot convert it
    catalog.failures = {1: [503, 500, 502], 2: [429, 429, 429, 429, 429, 503], 3: [429, 500]}
    try:
        cfg = inbound_config(tmp_path, stack, pg_db, f"{topic_prefix}.pim.products",
                             PULL.format(url=catalog.server.url) + OAUTH.format(
                                 url=catalog.server.url))
        server = WorkerServer.on_free_port()  # what --metrics-port serves
        puller = Puller(load_config(cfg), "products", server=server)
        try:
            stats = puller.run(once=True)
        finally:
            puller.close()
        health = httpx.get(f"{server.url}/healthz", timeout=10)
        ready = httpx.get(f"{server.url}/readyz", timeout=10)
        server.close()
        assert health.status_code == 200 and ready.status_code == 503  # done: not ready
        assert stats.pages == 3 and stats.entities == 24 and stats.failed == 1
        assert stats.retries == 12  # 11 injected failures and the refused token
        assert catalog.tokens == ["tok-1", "tok-2"]
        run_worker(cfg, "products")
        assert len(rows(pg_db)) == 23  # 25 less the two bad ones
        with psycopg.connect(pg_db) as conn:
            tasks = conn.execute(
                "SELECT partition, status, error, import_log FROM dx.task "
                "WHERE route = 'products' ORDER BY error").fetchall()
        assert [t[1] for t in tasks] == ["dead", "dead"]
        by_field = {t[2].split(":")[0]: t for t in tasks}
        # the worker's validation names the field; the task's import log names page and item
        name_task = by_field["field 'name'"]
        assert "41 characters" in name_task[2]
        received = name_task[3]["received"]["headers"]
        assert (received["dx.inbound.kind"], received["dx.inbound.page"],
                received["dx.inbound.item"]) == ("pull", "3", "3")
        # the puller's mapping failure names page, item and field in the error itself
        map_task = by_field["page 3 item 4"]
        assert map_task[0] == -1
        assert "mapping price: cannot convert 'not a price' to decimal" in map_task[2]
    finally:
        catalog.server.close()


def test_a_failing_pull_is_one_error_line_and_a_status_problem(
        tmp_path: Path, stack: Any, pg_db: str, topic_prefix: str) -> None:
    products_table(pg_db)
    catalog = Catalog(3)
    try:
        cfg = inbound_config(tmp_path, stack, pg_db, f"{topic_prefix}.pim.products",
                             PULL.format(url=catalog.server.url))
        assert pull_once(load_config(cfg)).entities == 3
        cfg.write_text(cfg.read_text().replace("/products\n", "/missing\n"))
        catalog.server.handler = lambda *a: (404, {}, {"error": "no such collection"})
        done = subprocess.run(dx_pull(cfg), capture_output=True, text=True, timeout=120,
                              env=ENV)
        assert done.returncode == 1
        assert done.stderr.strip().splitlines() == [
            f"dx: error: pull products: GET {catalog.server.url}/missing?updated_since=3&limit=10"
            f"&page=1: HTTP 404: {{\"error\": \"no such collection\"}}"]
        from pipeline.status import collect

        with psycopg.connect(pg_db) as conn:
            st = collect(conn, load_config(cfg))
        route = next(r for r in st.routes if r.name == "products")
        (pull,) = route.incoming
        assert (pull.kind, pull.pages, pull.entities, pull.errors, pull.failing) == (
            "pull", 1, 3, 1, True)
        assert any("products (source): the last pull failed: pull products: GET" in p
                   for p in st.problems)
    finally:
        catalog.server.close()


def test_with_kafka_unreachable_the_cursor_does_not_move(
        tmp_path: Path, stack: Any, pg_db: str, topic_prefix: str) -> None:
    products_table(pg_db)
    catalog = Catalog(5)
    try:
        cfg = inbound_config(tmp_path, stack, pg_db, f"{topic_prefix}.pim.products",
                             PULL.format(url=catalog.server.url) + "        ack_timeout_s: 2\n")
        cfg.write_text(cfg.read_text().replace(stack.kafka_bootstrap,
                                               f"127.0.0.1:{free_port()}"))
        (line,) = failed_pull(cfg)
        assert line.startswith("dx: error: kafka unreachable at 127.0.0.1:")
        assert "pim.products" in line
        with psycopg.connect(pg_db) as conn:
            row = conn.execute("SELECT cursor, pages, errors FROM dx.inbound_state "
                               "WHERE route = 'products'").fetchone()
        assert row == (None, 0, 1)  # nothing acknowledged: nothing moved on
    finally:
        catalog.server.close()


def test_a_next_link_or_redirect_to_another_host_never_gets_the_credentials(
        tmp_path: Path, stack: Any, pg_db: str, topic_prefix: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DX_TEST_PULL_SECRET", "key-for-tests")
    products_table(pg_db)
    elsewhere = ThirdParty(lambda *_: (200, {}, {"data": []}))
    entity = {"id": 1, "code": "a", "title": "one", "seq": 1}

    def pim(method: str, path: str, query: dict[str, str], headers: dict[str, str],
            body: bytes) -> tuple[int, dict[str, str], Any]:
        if path == "/moved":
            return 302, {"Location": f"{elsewhere.url}/products"}, b""
        return 200, {}, {"data": [entity], "next": f"{elsewhere.url}/products?page=2"}
    home = ThirdParty(pim)
    try:
        for n, path in enumerate(("/products", "/moved")):
            cfg = inbound_config(tmp_path, stack, pg_db, f"{topic_prefix}.pim{n}.products", f"""\
      mapping: {{fields: {{id: id, sku: code, name: title, seq: seq}}}}
      pull:
        url: {home.url}{path}
        auth: {{kind: api_key, key: "${{DX_TEST_PULL_SECRET}}"}}
        items: data
        pagination: {{kind: next, token_path: next}}
""")
            with pytest.raises(TerminalError, match=r"not the host of pull\.url"):
                pull_once(load_config(cfg))
        assert elsewhere.requests == []
    finally:
        home.close()
        elsewhere.close()


def test_a_refusal_quoting_a_nul_byte_is_recorded_and_raised_as_one_error(
        tmp_path: Path, stack: Any, pg_db: str, topic_prefix: str) -> None:
    products_table(pg_db)
    pim = ThirdParty(lambda *_: (400, {}, b'{"error": "bad \x00 request"}'))
    try:
        cfg = inbound_config(tmp_path, stack, pg_db, f"{topic_prefix}.pim.products",
                             f"      pull: {{url: {pim.url}/products}}\n")
        with pytest.raises(TerminalError, match="HTTP 400"):  # not psycopg's DataError
            pull_once(load_config(cfg))
    finally:
        pim.close()
    with psycopg.connect(pg_db) as conn:
        (error,) = conn.execute("SELECT last_error FROM dx.inbound_state").fetchone() or ("",)
    assert "HTTP 400" in error and "\\0" in error


def test_an_entity_changed_mid_run_shifts_no_other_past_a_keyset_pull(
        tmp_path: Path, stack: Any, pg_db: str, topic_prefix: str) -> None:
    """Without keyset, page 2 of the changed feed starts one entity later: item 11 slides onto
    page 1, already read, and the watermark passes it for good."""
    products_table(pg_db)
    catalog = Catalog(30)
    try:
        pull = PULL.format(url=catalog.server.url).replace(
            "compare: number}", "compare: number, keyset: true}")
        cfg = inbound_config(tmp_path, stack, pg_db, f"{topic_prefix}.pim.products", pull)
        edited: list[int] = []

        def edit_once(page: int, cursor: Any) -> None:
            if not edited:  # item 3 changes after page 1: it moves to the end of the feed
                edited.append(page)
                catalog.change(3, "edited", "3.75")
        puller = Puller(load_config(cfg), "products", on_page=edit_once)
        try:
            puller.run(once=True)
            puller.run(once=True)  # the next run: from the watermark
        finally:
            puller.close()
    finally:
        catalog.server.close()
    run_worker(cfg, "products")
    assert sorted(rows(pg_db)) == list(range(1, 31)) and rows(pg_db)[3][1] == "edited"


@pytest.mark.parametrize("retry_after", ["0", "3600"], ids=["short", "longer-than-backoff"])
def test_once_gives_up_on_a_target_that_throttles_for_ever(
        tmp_path: Path, stack: Any, pg_db: str, topic_prefix: str, retry_after: str) -> None:
    """Review: ``--once`` waited as told by every 429 without using up an attempt, so a
    target answering 429 for ever (or with a Retry-After of an hour) hung the command. Now
    ``--once`` allows ``retry.max_attempts`` throttled answers in a row and waits no longer
    than ``retry.backoff_max_s``: one error line, exit 1, the cursor where it was."""
    products_table(pg_db)
    catalog = Catalog(3)
    try:
        cfg = inbound_config(tmp_path, stack, pg_db, f"{topic_prefix}.pim.products",
                             PULL.format(url=catalog.server.url))
        catalog.server.handler = lambda *a: (429, {"Retry-After": retry_after},
                                             {"error": "slow down"})
        lines = failed_pull(cfg)
        (line,) = [x for x in lines if x.startswith("dx: error")]
        assert line == lines[-1]  # retries are warnings before it
        assert line.startswith("dx: error: pull products: GET ") and "HTTP 429" in line
        if retry_after == "0":
            assert line.endswith("(still throttled after 6 requests; --once gives up)")
            assert len(catalog.server.requests) == 6
        else:
            assert "retry after 3600s, longer than retry.backoff_max_s" in line
            assert len(catalog.server.requests) == 1
        assert pull_state(pg_db)[1] is None
    finally:
        catalog.server.close()


def test_a_page_larger_than_the_limit_fails_the_run_without_being_held(
        tmp_path: Path, stack: Any, pg_db: str, topic_prefix: str) -> None:
    """Review: a page was read whole into memory, however large. The body is read in chunks
    and a page over ``max_page_mb`` ends the run with one line (pages before it are kept)."""
    products_table(pg_db)
    catalog = Catalog(25)
    big = {"data": [{"id": i, "code": "x" * 1000, "title": "t", "attributes": {"price": "1"},
                     "seq": 1} for i in range(200)]}  # ~220 KB
    try:
        cfg = inbound_config(tmp_path, stack, pg_db, f"{topic_prefix}.pim.products",
                             PULL.format(url=catalog.server.url) + "        max_page_mb: 0.1\n")
        normal = catalog.handle

        def handler(method: str, path: str, query: dict[str, str], headers: dict[str, str],
                    body: bytes) -> tuple[int, dict[str, str], Any]:
            if query.get("page") == "2":
                return 200, {}, big
            return normal(method, path, query, headers, body)

        catalog.server.handler = handler
        (line,) = failed_pull(cfg)
        assert line.startswith("dx: error: pull products: GET ")
        assert "page=2" in line and "larger than pull.max_page_mb (0.1 MB)" in line
        pages, cursor = pull_state(pg_db)
        assert pages == 1 and cursor is not None and '"next": 2' in cursor
    finally:
        catalog.server.close()
