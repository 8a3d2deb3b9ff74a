"""A third party's record -> the route's fields, and the event id of one entity version.

The mapping is the sink mapping language (``pipeline.sink.mapping.RouteLogic``), reused as it
is: the third party's record plays the role of the row image, so ``from: attributes.weight``,
``template``, ``const``, ``type`` and ``default`` mean what they mean on sink routes.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

import simplejson

from pipeline.config.inbound import InboundConfig
from pipeline.config.sinks import FilterConfig, SinkRoute
from pipeline.sink.mapping import Event, MappingError, RouteLogic

#: Event ids of inbound entities: uuid5 in this namespace over the route and the entity's
#: identity, so the same entity version received twice is the same event.
NAMESPACE = uuid.UUID("0b7c3f52-6d0e-4a8e-b6f4-3f1d7c9a2e51")

__all__ = ["NAMESPACE", "Mapper", "MappingError", "canonical", "event_id", "loads_exact"]


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def loads_exact(data: bytes | str) -> Any:
    """JSON as a third party sent it: numbers with a fraction or exponent become ``Decimal``
    (``19.99`` stays ``19.99``, a 20-digit amount keeps every digit on its way to a numeric
    column); ``NaN``/``Infinity`` are refused (not JSON). Raises ``ValueError`` (also for a
    body nested too deeply to parse)."""
    try:
        return json.loads(data, parse_float=Decimal, parse_constant=_no_constant)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def canonical(value: Any) -> str:
    """One text per JSON value (sorted keys, no spaces): the message value and the input of
    derived ids. ``Decimal`` numbers are written as JSON numbers with their exact digits."""
    return simplejson.dumps(value, sort_keys=True, separators=(",", ":"), default=str,
                            use_decimal=True)


class Mapper:
    """Applies ``inbound.mapping`` (identity without one). Raises :class:`MappingError` for a
    record the mapping cannot convert; that record fails alone."""

    def __init__(self, route_name: str, inbound: InboundConfig | None) -> None:
        mapping = inbound.mapping if inbound is not None else None
        self.id_fields = inbound.id_fields if inbound is not None else None
        self.logic: RouteLogic | None = None
        self.route = route_name
        if mapping is not None:
            # RouteLogic reads only a route's filter and mapping; model_construct skips the
            # connector, which an inbound mapping does not have.
            fields: dict[str, Any] = {"name": route_name, "topics": [route_name],
                                      "mapping": mapping, "filter": FilterConfig()}
            self.logic = RouteLogic(SinkRoute.model_construct(**fields))

    def __call__(self, record: Mapping[str, Any]) -> dict[str, Any]:
        if self.logic is None:
            return dict(record)
        event = Event(topic=self.route, partition=0, offset=0, key={},
                      value={"op": "c", "after": dict(record)})
        out = self.logic.map(event)
        return out or {}


def event_id(route: str, record: Mapping[str, Any], id_fields: list[str] | None) -> str:
    """Derived from ``id_fields`` (route fields naming one entity version) when all are
    present, else from the whole record: deterministic, so a re-sent entity is the same event."""
    if id_fields and all(record.get(f) is not None for f in id_fields):
        basis = canonical([record[f] for f in id_fields])
    else:
        basis = canonical(record)
    return str(uuid.uuid5(NAMESPACE, f"{route}\n{basis}"))
