"""``dx.source_offsets``: where each route is in each partition, stored in the same PostgreSQL
transaction as the rows applied from it. This is the source of truth for exactly-once inbound
apply; offsets committed to Kafka (if any) only feed lag tools.

Every batch first locks the offset rows of the partitions it covers and checks they still hold
the positions this worker started from (compare-and-set). A worker that lost a partition in a
rebalance but is still finishing a batch (a "zombie") finds the row moved on, rolls back, and
re-seeks, so a range is never applied twice even when two workers briefly overlap.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import psycopg
from confluent_kafka import Consumer, TopicPartition

from pipeline.errors import EventError, TransientError

log = logging.getLogger(__name__)

DDL = """
CREATE SCHEMA IF NOT EXISTS dx;
CREATE TABLE IF NOT EXISTS dx.source_offsets (
    route       text        NOT NULL,
    topic       text        NOT NULL,
    partition   integer     NOT NULL,
    next_offset bigint      NOT NULL CHECK (next_offset >= 0),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (route, topic, partition)
);
COMMENT ON TABLE dx.source_offsets IS
  'dx source workers: next Kafka offset to apply per route/partition (exactly-once apply)';
ALTER TABLE dx.source_offsets ADD COLUMN IF NOT EXISTS topic_id text;
COMMENT ON COLUMN dx.source_offsets.topic_id IS
  'the topic''s id when the offset was stored: a re-created topic (or a mirror) has another';
"""


class Fenced(TransientError):
    """Another worker moved this route's offsets on: the batch is abandoned and re-read."""


def ensure_schema(conn: psycopg.Connection[Any]) -> None:
    """Create the offsets table (idempotent; ``dx init`` calls it). Commits."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('dx.source_offsets'))")
        for stmt in DDL.split(";"):
            if stmt.strip():
                conn.execute(stmt)


def load(conn: psycopg.Connection[Any], route: str, topic: str,
         partitions: Iterable[int]) -> dict[int, int]:
    """Stored next offsets of ``partitions`` (missing: never applied)."""
    rows = conn.execute(
        "SELECT partition, next_offset FROM dx.source_offsets "
        "WHERE route = %s AND topic = %s AND partition = ANY(%s)",
        (route, topic, list(partitions)),
    ).fetchall()
    return {int(p): int(o) for p, o in rows}


def topic_ids(conn: psycopg.Connection[Any], route: str, topic: str,
              partitions: Iterable[int]) -> dict[int, str]:
    """The topic id each of ``partitions``' offsets was stored under (where one was known)."""
    rows = conn.execute(
        "SELECT partition, topic_id FROM dx.source_offsets WHERE route = %s AND topic = %s "
        "AND partition = ANY(%s) AND topic_id IS NOT NULL",
        (route, topic, list(partitions)),
    ).fetchall()
    return {int(p): str(t) for p, t in rows}


def lock_and_check(conn: psycopg.Connection[Any], route: str, topic: str,
                   expected: Mapping[int, int | None]) -> None:
    """Lock the offset rows of a batch and check they hold ``expected`` (None: no row yet).

    Raises :class:`Fenced` when another worker has moved on. Two workers racing on a partition
    with no row yet both pass here; the second one's insert in :func:`store` then fails on the
    primary key, which the worker treats the same way.
    """
    rows = conn.execute(
        "SELECT partition, next_offset FROM dx.source_offsets "
        "WHERE route = %s AND topic = %s AND partition = ANY(%s) ORDER BY partition FOR UPDATE",
        (route, topic, sorted(expected)),
    ).fetchall()
    stored = {int(p): int(o) for p, o in rows}
    for partition, want in expected.items():
        have = stored.get(partition)
        if have != want:
            raise Fenced(f"route {route}: {topic}[{partition}] is at offset {have} in "
                         f"dx.source_offsets, this worker expected {want}; re-reading")


def store(conn: psycopg.Connection[Any], route: str, topic: str,
          next_offsets: Mapping[int, int], expected: Mapping[int, int | None],
          topic_id: str | None = None) -> None:
    """Write the new positions (inside the batch's transaction), with the id of the topic
    they belong to (kept when unknown)."""
    with conn.cursor() as cur:
        for partition, nxt in sorted(next_offsets.items()):
            if expected.get(partition) is None:
                cur.execute(
                    "INSERT INTO dx.source_offsets (route, topic, partition, next_offset, "
                    "topic_id) VALUES (%s, %s, %s, %s, %s)",
                    (route, topic, partition, nxt, topic_id))
            else:
                cur.execute(
                    "UPDATE dx.source_offsets SET next_offset = %s, updated_at = now(), "
                    "topic_id = COALESCE(%s, topic_id) "
                    "WHERE route = %s AND topic = %s AND partition = %s",
                    (nxt, topic_id, route, topic, partition))


def check_stored(c: Consumer, name: str, topic: str, stored: dict[int, int],
                 ids: dict[int, str], topic_id: str | None, *, accept_topic_reset: bool,
                 accept_retention_gap: bool) -> dict[int, int]:
    """Compare each stored offset with the partition's log before resuming there.

    * Below the log start: Kafka deleted messages (retention) before they were applied.
      Kafka would silently resume at the log start.
    * Beyond the log end: the topic was re-created, or this is another cluster's copy (a
      mirror keeps its own offsets). Kafka would silently skip every message below the
      stored offset (they look like replays), so new messages are never applied.
    * Stored for a topic with another id (``ids``): the same, caught even when the new
      topic has already grown past the stored offset.

    dx stops on either, naming the partition, unless the operator accepted it for this run
    (``--accept-retention-gap`` / ``--accept-topic-reset``). Returns where to resume each
    accepted partition instead of its stored offset."""
    resume: dict[int, int] = {}
    for partition, offset in sorted(stored.items()):
        low, high = c.get_watermark_offsets(TopicPartition(topic, partition), timeout=10,
                                            cached=False)
        was = ids.get(partition)
        replaced = was is not None and topic_id is not None and was != topic_id
        reset = None
        if offset > high:
            reset = (f"the stored offset {offset} (dx.source_offsets) is beyond the "
                     f"partition's end {high}: the topic was re-created or is another "
                     "cluster's copy, and messages below the stored offset would be skipped")
        elif replaced:
            reset = (f"the stored offset {offset} (dx.source_offsets) belongs to another "
                     f"topic of this name (id {was}, now {topic_id}): the topic was "
                     "re-created or is another cluster's copy")
        if reset is not None:
            if not accept_topic_reset:
                raise EventError(f"route {name}: {reset}; apply the partition from its "
                                 f"start with 'dx source run {name} --accept-topic-reset'",
                                 topic=topic, partition=partition, offset=offset)
            log.warning("route %s: %s[%d]: %s; applying from its start %d "
                        "(--accept-topic-reset)", name, topic, partition, reset, low)
            resume[partition] = low
        elif offset < low:
            lost = f"messages {offset}..{low - 1} were deleted (retention) before being applied"
            if not accept_retention_gap:
                raise EventError(f"route {name}: {lost}; restore them from their "
                                 "source, or accept the loss with 'dx source run "
                                 f"{name} --accept-retention-gap'",
                                 topic=topic, partition=partition, offset=offset)
            log.warning("route %s: %s[%d]: %s; continuing at %d (--accept-retention-gap)",
                        name, topic, partition, lost, low)
    return resume
