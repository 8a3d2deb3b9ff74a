"""RoutePause, what workers ask every loop: the operator's pause and resume arrive within the
re-read interval, and a database that cannot be read neither pauses nor resumes a route."""

from __future__ import annotations

import time
from typing import Any

import psycopg

from pipeline.routes.pause import RoutePause, ensure_schema, paused_routes, set_paused


def test_pause_and_resume_reach_the_worker_within_the_interval(pg_db: str) -> None:
    with psycopg.connect(pg_db) as conn:
        ensure_schema(conn)
    pause = RoutePause(pg_db, "sink", "pim", interval_s=0.2)
    other = RoutePause(pg_db, "source", "pim", interval_s=0.2)  # same name, other kind
    try:
        assert pause.paused() is False
        with psycopg.connect(pg_db) as conn:
            assert set_paused(conn, "sink", "pim", True, "ana") is True
            assert set_paused(conn, "sink", "pim", True, "ana") is False  # not a change
            conn.commit()
            assert paused_routes(conn) == {("sink", "pim")}
        time.sleep(0.3)
        assert pause.paused() is True and other.paused() is False
        with psycopg.connect(pg_db) as conn:
            set_paused(conn, "sink", "pim", False, "ana")
            conn.commit()
        time.sleep(0.3)
        assert pause.paused() is False
    finally:
        pause.close()
        other.close()


def test_an_unreadable_database_keeps_the_last_answer(pg_db: str, stack: Any) -> None:
    with psycopg.connect(pg_db) as conn:
        ensure_schema(conn)
        set_paused(conn, "source", "erp", True, "ana")
        conn.commit()
    pause = RoutePause(pg_db, "source", "erp", interval_s=0.05)
    assert pause.paused() is True
    pause.url = pg_db.rsplit("/", 1)[0] + "/no_such_database"
    pause.close()  # the next read opens a connection to the unreachable database
    time.sleep(0.1)
    assert pause.paused() is True  # still paused: an outage does not resume a route
    fresh = RoutePause(pause.url, "source", "erp", interval_s=0.05)
    assert fresh.paused() is False  # nothing known yet, and nothing readable: not paused
