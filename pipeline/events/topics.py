"""Creating the Kafka topics dx writes to, explicitly, before the first write.

Production clusters usually run with ``auto.create.topics.enable=false``. A topic left to
broker auto-create then never appears, and the first write to it fails with a timeout that
looks like an unreachable broker. So every topic dx produces to (entity topics, dead-letter
topics, the relay's state topic, inbound topics ``dx import`` writes) is created here first,
with the partitions, replication factor and settings the configuration asks for (``kafka.
new_topics``); existing topics are left exactly as they are.

One entry point, :func:`ensure_topics` (the relay, the sink and source workers, inbound
producers, ``dx import`` and the demo all call it); :func:`topic_spec` builds a spec with the
configured defaults; :func:`ensure_route_topics` creates a source route's two topics. A
refusal the operator must fix (not authorized, a replication factor the cluster cannot meet,
a policy) is a :class:`TerminalError` naming the topic and what to do; a broker that does not
answer is :class:`ServiceUnavailable`.

Consumers never create topics either (``allow.auto.create.topics`` stays at the client
default, false): a sink route subscribed to a topic that does not exist yet (the relay makes
it with the first event) says so in one warning line at start and waits.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from confluent_kafka import KafkaError, KafkaException, TopicCollection
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from pipeline.config.model import KafkaConfig
from pipeline.config.sources import SourceRoute
from pipeline.errors import ServiceUnavailable, TerminalError
from pipeline.observability.logging import KAFKA_LOG

#: Broker refusals retrying cannot fix: the operator must create the topic or change settings.
_REFUSED = {
    KafkaError.TOPIC_AUTHORIZATION_FAILED: "not authorized to create topics",
    KafkaError.CLUSTER_AUTHORIZATION_FAILED: "not authorized to create topics",
    KafkaError.INVALID_REPLICATION_FACTOR: "invalid replication factor",
    KafkaError.INVALID_PARTITIONS: "invalid number of partitions",
    KafkaError.INVALID_CONFIG: "invalid topic setting",
    KafkaError.POLICY_VIOLATION: "refused by the cluster's topic policy",
    KafkaError.TOPIC_EXCEPTION: "invalid topic name",
}


@dataclass(frozen=True)
class TopicSpec:
    """A topic dx needs. ``-1`` partitions or replication factor: the broker's default."""

    name: str
    purpose: str  # for error messages: "dead-letter topic of source route stock"
    partitions: int = 1
    replication_factor: int = -1
    config: Mapping[str, str] = field(default_factory=dict)


def topic_spec(kafka: KafkaConfig, name: str, purpose: str, *, partitions: int | None = None,
               config: Mapping[str, str] | None = None) -> TopicSpec:
    """A spec with the configured defaults (``kafka.new_topics``); ``partitions`` overrides
    the configured count where a topic must have a fixed shape (the relay's state topic), and
    ``config`` adds settings the topic needs (``cleanup.policy: compact``) over the defaults."""
    new = kafka.new_topics
    return TopicSpec(name=name, purpose=purpose,
                     partitions=partitions if partitions is not None else new.partitions,
                     replication_factor=new.replication_factor or -1,
                     config={**{k: str(v) for k, v in new.config.items()}, **(config or {})})


def ensure_route_topics(kafka: KafkaConfig, route: SourceRoute,
                        admin: AdminClient | None = None, *, timeout_s: float = 30.0
                        ) -> list[str]:
    """Create a source route's inbound and dead-letter topics if missing. Whoever writes the
    inbound topic (webhooks, pulls, file drops, ``dx import``) or reads it (the source worker)
    creates both, so the first dead letter never waits for a topic nobody made."""
    admin = admin or AdminClient(kafka.librdkafka(), logger=KAFKA_LOG)
    return ensure_topics(admin, [
        topic_spec(kafka, route.topic, f"inbound topic of source route {route.name}"),
        topic_spec(kafka, route.dlq_topic, f"dead-letter topic of source route {route.name}")],
        timeout_s=timeout_s)


def ensure_topics(admin: AdminClient, specs: Iterable[TopicSpec], *,
                  timeout_s: float = 30.0) -> list[str]:
    """Create the topics of ``specs`` that do not exist; return the names created.

    Waits until the cluster's metadata lists every created topic with its partitions, so a
    producer or consumer started right after finds it. Existing topics are not altered (their
    partition count and settings stay whatever their owner chose)."""
    wanted = {s.name: s for s in specs}
    if not wanted:
        return []
    missing = [s for name, s in wanted.items() if name not in existing_topics(admin, timeout_s)]
    if not missing:
        return []
    futures = admin.create_topics(
        [NewTopic(s.name, num_partitions=s.partitions, replication_factor=s.replication_factor,
                  config=dict(s.config)) for s in missing],
        operation_timeout=timeout_s, request_timeout=timeout_s)
    created = []
    for s in missing:
        try:
            futures[s.name].result(timeout_s)
            created.append(s.name)
        except KafkaException as err:
            kerr = err.args[0]
            code = kerr.code() if isinstance(kerr, KafkaError) else None
            if code == KafkaError.TOPIC_ALREADY_EXISTS:
                continue  # someone else was quicker: fine
            what = f"cannot create Kafka topic {s.name!r} ({s.purpose})"
            detail = kerr.str() if isinstance(kerr, KafkaError) else str(kerr)
            if code in _REFUSED:
                raise TerminalError(
                    f"{what}: {_REFUSED[code]}: {detail}; create it yourself ({_shape(s)}) or "
                    "fix kafka.new_topics / the client's permissions") from None
            raise ServiceUnavailable("kafka", s.name, f"{what}: {detail}") from None
    _wait_visible(admin, [wanted[n] for n in created], timeout_s)
    return created


def _shape(s: TopicSpec) -> str:
    parts = "broker default" if s.partitions < 0 else str(s.partitions)
    repl = "broker default" if s.replication_factor < 0 else str(s.replication_factor)
    return f"partitions {parts}, replication factor {repl}"


def existing_topics(admin: AdminClient, timeout_s: float, *, where: str = "list topics"
                    ) -> set[str]:
    """The cluster's topic names, asked of an admin client (a consumer that listed topics
    before subscribing noticed a topic created later only at its next full metadata refresh,
    5 minutes by default); no broker answering is :class:`ServiceUnavailable` at ``where``."""
    try:
        return set(admin.list_topics(timeout=timeout_s).topics)
    except KafkaException as err:
        raise ServiceUnavailable("kafka", where,
                                 f"no broker answered within {timeout_s:.0f}s ({err.args[0]})"
                                 ) from None


def _wait_visible(admin: AdminClient, specs: list[TopicSpec], timeout_s: float) -> None:
    """Topic creation returns before every broker's metadata has the topic."""
    deadline = time.monotonic() + timeout_s
    pending = {s.name for s in specs}
    while pending:
        md = admin.list_topics(timeout=timeout_s)
        for name in list(pending):
            t = md.topics.get(name)
            if t is not None and t.error is None and t.partitions:
                pending.discard(name)
        if not pending:
            return
        if time.monotonic() > deadline:
            raise ServiceUnavailable("kafka", ", ".join(sorted(pending)),
                                     "created topics did not appear in the cluster's metadata")
        time.sleep(0.1)


def topic_id(admin: AdminClient, name: str, *, timeout_s: float = 30.0) -> str | None:
    """The cluster's id of topic ``name`` (a UUID; a re-created topic, or its copy on another
    cluster, has another one), or None when the topic or the broker does not report one."""
    try:
        described = admin.describe_topics(TopicCollection([name]),
                                          request_timeout=timeout_s)[name].result(timeout_s)
    except KafkaException:
        return None
    found = getattr(described, "topic_id", None)
    return None if found is None else str(found)
