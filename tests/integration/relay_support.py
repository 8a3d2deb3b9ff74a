"""Shared pieces of the capture/relay integration tests: a dx.yaml per test, a relay running in
a thread or a subprocess, and a consumer that is not dx code (confluent_kafka's
AvroDeserializer) reading the topics back."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from confluent_kafka import Consumer, KafkaError, TopicPartition
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer
from confluent_kafka.serialization import MessageField, SerializationContext

from pipeline.capture.origin import mark_origin
from pipeline.config.loader import load_config
from pipeline.relay.runner import Relay

DEMO = Path(__file__).resolve().parents[2] / "deploy" / "demo"


def render_demo_config(path: Path, values: dict[str, str]) -> Path:
    """The demo's own template (deploy/demo/dx.yaml) with its ${NAME} placeholders filled: the
    test runs the exchange users see."""
    def fill(m: re.Match[str]) -> str:
        return values[m.group(1)]

    text = (DEMO / "dx.yaml").read_text()
    path.write_text(re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", fill, text))
    return path


def load_demo_shop(db_url: str) -> None:
    """The demo shop's tables and seed rows (deploy/demo/shop.sql) in ``db_url``."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute((DEMO / "shop.sql").read_text())  # type: ignore[arg-type]


def write_config(path: Path, stack: Any, db_url: str, prefix: str, tables: str,
                 mode: str = "exactly-once", extra: str = "",
                 capture_mode: str | None = "trigger") -> Path:
    """A dx.yaml for one test: trigger capture unless the test asks for ``capture_mode``
    (the ``capture_mode`` fixture runs it in both; None leaves capture.mode at its default)."""
    if capture_mode is not None:
        extra = f"capture:\n  mode: {capture_mode}\n{extra}"
    path.write_text(f"""
database:
  url: {db_url}
kafka:
  bootstrap_servers: {stack.kafka_bootstrap}
  topic_prefix: {prefix}
schema_registry:
  url: {stack.schema_registry_url}
relay:
  name: {prefix}
  mode: {mode}
  batch_size: 500
  poll_interval_s: 0.02
  standby_poll_s: 0.2
tables:
{tables}
{extra}
""")
    return path


def dx(*args: str, env: dict[str, str] | None = None, check: bool = False,
       timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=timeout,
                          check=check)


@contextmanager
def in_thread(run: Callable[[], Any], stop: Callable[[], Any]) -> Iterator[None]:
    """``run`` in a daemon thread for the block; ``stop`` ends it; its error is raised here."""
    errors: list[BaseException] = []

    def target() -> None:
        try:
            run()
        except BaseException as err:  # surfaced to the test below
            errors.append(err)

    t = threading.Thread(target=target, daemon=True)
    t.start()
    try:
        yield
    finally:
        stop()
        t.join(60)
    if errors:
        raise errors[0]


@contextmanager
def relay_thread(config_path: Path, *, reset_state: bool = False) -> Iterator[Relay]:
    relay = Relay(load_config(config_path), keep_latencies=True, reset_state=reset_state)
    with in_thread(relay.run, relay.stop.set):
        yield relay


def start_relay_process(config_path: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", "relay", "-c",
                             str(config_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


@dataclass
class Event:
    key: dict[str, Any] | None
    value: dict[str, Any] | None
    headers: dict[str, bytes]
    partition: int
    offset: int


class TopicReader:
    """Reads a topic from the beginning with a real consumer and the registry."""

    def __init__(self, stack: Any, topic: str, *, read_committed: bool = True) -> None:
        self.topic = topic
        registry = SchemaRegistryClient({"url": stack.schema_registry_url})
        self.key_de = AvroDeserializer(registry)
        self.value_de = AvroDeserializer(registry)
        self.consumer = Consumer({
            "bootstrap.servers": stack.kafka_bootstrap,
            "group.id": f"test-{topic}-{time.time_ns()}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "isolation.level": "read_committed" if read_committed else "read_uncommitted",
        })
        self.consumer.subscribe([topic])
        self.events: list[Event] = []

    def read(self, until: int, timeout_s: float = 60.0, settle_s: float = 0.0) -> list[Event]:
        """Read until at least ``until`` events arrived, then keep reading ``settle_s`` more to
        catch duplicates."""
        deadline = time.monotonic() + timeout_s
        settle_end: float | None = None
        while time.monotonic() < deadline:
            if len(self.events) >= until and settle_end is None:
                settle_end = time.monotonic() + settle_s
            if settle_end is not None and time.monotonic() >= settle_end:
                break
            msg = self.consumer.poll(0.2)
            if msg is None:
                continue
            if msg.error():
                if msg.error().code() in (KafkaError._PARTITION_EOF,
                                          KafkaError.UNKNOWN_TOPIC_OR_PART):
                    continue
                raise AssertionError(str(msg.error()))
            kctx = SerializationContext(msg.topic(), MessageField.KEY)
            vctx = SerializationContext(msg.topic(), MessageField.VALUE)
            self.events.append(Event(
                key=self.key_de(msg.key(), kctx),
                value=self.value_de(msg.value(), vctx) if msg.value() is not None else None,
                headers=dict(msg.headers() or []),
                partition=msg.partition(), offset=msg.offset()))
        return self.events

    def close(self) -> None:
        self.consumer.close()


def raw_first_message(stack: Any, topic: str) -> bytes:
    c = Consumer({"bootstrap.servers": stack.kafka_bootstrap, "group.id": f"raw-{time.time_ns()}",
                  "enable.auto.commit": False})
    c.assign([TopicPartition(topic, 0, 0)])
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            msg = c.poll(0.5)
            if msg is not None and not msg.error() and msg.value() is not None:
                return bytes(msg.value())
        raise AssertionError(f"no message on {topic}")
    finally:
        c.close()


def execute(url: str, *statements: str, origin: str | None = None) -> None:
    with psycopg.connect(url) as conn:
        if origin:
            mark_origin(conn, origin)
        for s in statements:
            conn.execute(s)  # type: ignore[arg-type]


def captured_items(stack: Any, db_url: str, prefix: str, tmp_path: Path,
                   mode: str = "exactly-once", capture_mode: str | None = "trigger") -> Path:
    """A table ``items (id, v)`` with capture installed (topic ``<prefix>.public.items``);
    returns the dx.yaml path."""
    execute(db_url, "CREATE TABLE items (id int PRIMARY KEY, v int NOT NULL DEFAULT 0)")
    cfg = write_config(tmp_path / "dx.yaml", stack, db_url, prefix,
                       "  - name: items\n    columns: [id, v]\n", mode=mode,
                       capture_mode=capture_mode)
    res = dx("capture", "install", "-c", str(cfg))
    assert res.returncode == 0, res.stderr
    return cfg
