"""Entities an inbound kind refuses before Kafka (a pulled record the mapping cannot convert, a
dropped file's rejected line) become dead tasks of the route, like the entities its worker
refuses, so the task log and the ``dead_tasks`` alert cover every kind.

Such a task never had a Kafka position: its partition is -1 and its offset is derived from the
entity's content, so reading the same page or file again updates the task instead of adding
one. Fix the data at the source (it is received again), or ``dx tasks skip`` the task.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping

from pipeline.inbound.entities import NAMESPACE
from pipeline.source.events import Failure, RawMessage


def rejected(route: str, topic: str, raw: bytes, provenance: Mapping[str, str | int],
             reason: str, field: str | None = None) -> Failure:
    """A dead task for ``raw`` (what was received), with ``reason`` saying where and why."""
    eid = uuid.uuid5(NAMESPACE, f"{route}\nrejected\n{raw.hex()}")
    headers = tuple((f"dx.inbound.{k}", str(v).encode()) for k, v in provenance.items())
    message = RawMessage(topic, -1, eid.int >> 65, None, raw, headers)
    return Failure(message, "dead", reason, field, event_id=str(eid))
