"""The one text form of an entity key in ``dx.task.key``, and how ``--key`` finds it.

Sink tasks know the key's column names (the Kafka key is an Avro record) and store the object,
``{"id":42}`` (columns sorted); source tasks know the key's values in primary-key order and
store the list, ``[42]``. Both come from :func:`key_text`. :func:`key_match` is the read path
that makes ``dx tasks list --key`` find sink and source tasks alike, whichever form the operator
types (``42``, ``[42]``, ``{"id":42}``), also for rows written before this module existed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, overload

from psycopg import sql


@overload
def key_text(key: Mapping[str, Any] | Sequence[Any]) -> str: ...
@overload
def key_text(key: None) -> None: ...
def key_text(key: Mapping[str, Any] | Sequence[Any] | None) -> str | None:
    """Canonical text of a key: the same key always gives the same text (task store, lanes)."""
    if key is None:
        return None
    if isinstance(key, Mapping):
        return json.dumps(key, sort_keys=True, separators=(",", ":"), default=str)
    return json.dumps(list(key), separators=(",", ":"), default=str)


def key_match(text: str) -> tuple[sql.Composable, list[Any]]:
    """A condition on ``key`` (and its parameters) matching the key ``text`` in either form:
    the exact canonical text, or a key with the same values (as JSON, in any column order)."""
    try:
        given = json.loads(text)
    except ValueError:
        given = text  # a bare string key: sku-1
    if isinstance(given, dict):
        exact = {key_text(given), key_text(list(given.values()))}
        values = list(given.values())
    else:
        values = given if isinstance(given, list) else [given]
        exact = {key_text(values), text}
    # dx.task_key_values (pipeline.tasks.store) is indexed: both sides of the OR read an index
    cond = sql.SQL("(key = ANY(%s) OR dx.task_key_values(key) = dx.task_key_values(%s))")
    return cond, [sorted(e for e in exact if e is not None), json.dumps(values, default=str)]
