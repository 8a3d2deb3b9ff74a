"""The SQL of one entity, composed once per (re)load and kept, never composed per request.

Statements are built exactly as before (``psycopg.sql``: every table and column name from the
catalog quoted by ``sql.Identifier``, every value a bind parameter); what changed is *when*.
Composing and quoting a statement cost about as much Python time as a short query's round trip, so
the fixed ones (a row by key, with and without ``FOR UPDATE``, a delete) are rendered when the
entity is loaded, and the variable ones once per *shape* — which filters with which operators,
which sort, which fields a create sets, how many rows a batch insert has — in a bounded cache.
A request then only looks its text up and binds its values. The cache lives on the
:class:`~pipeline.api.catalog.Entity`, so a reload (new entities) starts a new one.

Rendered as ``str``: the identifiers' quoting does not depend on the encoding, and psycopg encodes
the text in the connection's encoding when it sends it (and caches its parse of it).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING

from psycopg import sql

if TYPE_CHECKING:
    from pipeline.api.catalog import Entity

#: Text kept per entity (characters); past it the cache starts over, so clients choosing ever
#: new shapes (filter combinations, [in] lengths, batch sizes) cost a composition each, never
#: unbounded memory. A statement longer than MAX_TEXT (a batch of thousands of rows) is not kept.
MAX_CACHED = 2_000_000
MAX_TEXT = 100_000


def key_condition(entity: Entity, alias: str | None = None) -> sql.Composable:
    """``"k1" = %s AND "k2" = %s`` over the entity's key columns."""
    return sql.SQL(" AND ").join(
        sql.SQL("{} = %s").format(sql.Identifier(alias, f.col) if alias else f.ident)
        for f in entity.key_fields)


class Statements:
    """One entity's statements as text, ready to execute."""

    def __init__(self, entity: Entity) -> None:
        e = entity
        by_key = sql.SQL("SELECT {} FROM {} WHERE {}").format(e.select_list(), e.ident,
                                                             key_condition(e))
        self.get = by_key.as_string()
        self.get_locked = (by_key + sql.SQL(" FOR UPDATE")).as_string()
        self.delete = sql.SQL("DELETE FROM {} WHERE {}").format(e.ident,
                                                                key_condition(e)).as_string()
        self._shapes: dict[Hashable, str] = {}
        self._size = 0
        self._lock = threading.Lock()

    def shaped(self, shape: Hashable, build: Callable[[], sql.Composable]) -> str:
        """The statement of ``shape``, composed by ``build`` the first time it is asked for."""
        found = self._shapes.get(shape)
        if found is None:
            found = build().as_string()
            if len(found) <= MAX_TEXT:
                with self._lock:
                    if self._size + len(found) > MAX_CACHED:
                        self._shapes.clear()
                        self._size = 0
                    self._shapes[shape] = found
                    self._size += len(found)
        return found
