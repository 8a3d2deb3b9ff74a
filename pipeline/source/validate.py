"""Validation of inbound rows against the target's catalog, before anything is written.

Every value is coerced to what its column accepts (int ranges, numeric precision and scale,
varchar lengths, enum labels, JSON text, ISO dates...) or rejected with the field named in the
producer's terms. Rejecting here rather than letting PostgreSQL fail keeps a bad event from
costing a savepoint bisection of its whole batch, and gives a reason a person can act on.

Input values come from three places with different habits: Avro (already typed by fastavro,
logical types included), JSON (strings and numbers) and CSV (strings only). The coercers accept
all three. Conventions (documented in the README): integer timestamps are epoch milliseconds,
naive timestamps for ``timestamptz`` are UTC, ``bytea`` strings are base64 or ``\\x`` hex.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import uuid
from collections.abc import Callable, Mapping
from decimal import Decimal, InvalidOperation
from typing import Any

import simplejson

from pipeline.config.sources import SourceRoute
from pipeline.source.catalog import Column, Target

Coercer = Callable[[Any], Any]

_INT_RANGE = {"int2": 2**15, "int4": 2**31, "int8": 2**63}
_TEXT = {"text", "varchar", "bpchar", "name", "citext"}
_TRUE = {"true", "t", "yes", "y", "1", "on"}
_FALSE = {"false", "f", "no", "n", "0", "off"}
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


class FieldError(ValueError):
    """One field of one event is invalid; ``field`` is the producer's field name."""

    def __init__(self, field: str | None, reason: str) -> None:
        self.field = field
        self.reason = reason
        super().__init__(f"field {field!r}: {reason}" if field else reason)


def _kind(v: Any) -> str:
    return "null" if v is None else type(v).__name__


def _int(col: Column) -> Coercer:
    bound = _INT_RANGE.get(col.type, 2**63)

    def coerce(v: Any) -> int:
        if isinstance(v, bool):
            raise ValueError(f"expected an integer, got {v!r}")
        if isinstance(v, int):
            n = v
        elif isinstance(v, str):
            try:
                n = int(v.strip())
            except ValueError:
                raise ValueError(f"expected an integer, got {v!r}") from None
        elif isinstance(v, float | Decimal) and v == v and int(v) == v:
            n = int(v)
        else:
            raise ValueError(f"expected an integer, got {_kind(v)} {v!r}")
        if not -bound <= n < bound:
            raise ValueError(f"{n} is out of range for {col.type}")
        return n

    return coerce


def _numeric(col: Column) -> Coercer:
    def coerce(v: Any) -> Decimal:
        if isinstance(v, bool) or not isinstance(v, int | float | str | Decimal):
            raise ValueError(f"expected a number, got {_kind(v)} {v!r}")
        try:
            d = Decimal(str(v).strip()) if not isinstance(v, Decimal) else v
        except InvalidOperation:
            raise ValueError(f"expected a number, got {v!r}") from None
        if not d.is_finite():
            if col.precision is not None:
                raise ValueError(f"{v!r} is not allowed in numeric({col.precision},{col.scale})")
            return d
        if col.precision is not None and col.scale is not None:
            # integer digits first, from the exponent: quantizing a huge value (1e308) would
            # overflow the decimal context instead of answering
            if abs(d) >= 1 and d.adjusted() + 1 > col.precision - col.scale:
                raise ValueError(f"{v} does not fit numeric({col.precision},{col.scale})")
            exp = int(d.as_tuple().exponent)
            if -exp > col.scale and d != d.quantize(Decimal(1).scaleb(-col.scale)):
                raise ValueError(f"{v} has more than {col.scale} decimal places")
        return d

    return coerce


def _float(_: Column) -> Coercer:
    def coerce(v: Any) -> float:
        if isinstance(v, bool):
            raise ValueError(f"expected a number, got {v!r}")
        if isinstance(v, int | float | Decimal):
            return float(v)
        if isinstance(v, str):
            try:
                return float(v.strip())
            except ValueError:
                pass
        raise ValueError(f"expected a number, got {_kind(v)} {v!r}")

    return coerce


def _bool(_: Column) -> Coercer:
    def coerce(v: Any) -> bool:
        if isinstance(v, bool):
            return v
        if isinstance(v, int) and v in (0, 1):
            return bool(v)
        if isinstance(v, str):
            s = v.strip().lower()
            if s in _TRUE:
                return True
            if s in _FALSE:
                return False
        raise ValueError(f"expected a boolean, got {_kind(v)} {v!r}")

    return coerce


def _text(col: Column) -> Coercer:
    limit = col.precision if col.type in ("varchar", "bpchar") else None

    def coerce(v: Any) -> str:
        if isinstance(v, str):
            s = v
        elif isinstance(v, int | float | Decimal) and not isinstance(v, bool):
            s = str(v)
        else:
            raise ValueError(f"expected a string, got {_kind(v)} {v!r}")
        if "\x00" in s:
            raise ValueError("contains a NUL character, which PostgreSQL text cannot store")
        if limit is not None and len(s) > limit and (col.type != "bpchar" or (s.rstrip(" ")
                                                     and len(s.rstrip(" ")) > limit)):
            raise ValueError(f"is {len(s)} characters long; the column allows {limit}")
        return s

    return coerce


def _enum(col: Column) -> Coercer:
    labels = frozenset(col.enum_labels)

    def coerce(v: Any) -> str:
        if not isinstance(v, str) or v not in labels:
            raise ValueError(f"{v!r} is not one of {', '.join(sorted(labels))}")
        return v

    return coerce


def _uuid(_: Column) -> Coercer:
    def coerce(v: Any) -> uuid.UUID:
        if isinstance(v, uuid.UUID):
            return v
        if isinstance(v, str):
            try:
                return uuid.UUID(v.strip())
            except ValueError:
                pass
        raise ValueError(f"expected a UUID, got {_kind(v)} {v!r}")

    return coerce


def _from_epoch_ms(v: int | float) -> dt.datetime:
    return _EPOCH + dt.timedelta(milliseconds=v)


def _timestamp(col: Column) -> Coercer:
    aware = col.type == "timestamptz"

    def coerce(v: Any) -> dt.datetime:
        if isinstance(v, bool):
            raise ValueError(f"expected a timestamp, got {v!r}")
        if isinstance(v, dt.datetime):
            d = v
        elif isinstance(v, int | float):
            d = _from_epoch_ms(v)
        elif isinstance(v, str):
            try:
                d = dt.datetime.fromisoformat(v.strip().replace("Z", "+00:00"))
            except ValueError:
                raise ValueError(f"expected an ISO 8601 timestamp, got {v!r}") from None
        else:
            raise ValueError(f"expected a timestamp, got {_kind(v)} {v!r}")
        if aware:
            return d if d.tzinfo is not None else d.replace(tzinfo=dt.UTC)
        return d.astimezone(dt.UTC).replace(tzinfo=None) if d.tzinfo is not None else d

    return coerce


def _date(_: Column) -> Coercer:
    def coerce(v: Any) -> dt.date:
        if isinstance(v, dt.datetime):
            raise ValueError(f"expected a date, got a timestamp {v.isoformat()}")
        if isinstance(v, dt.date):
            return v
        if isinstance(v, str):
            try:
                return dt.date.fromisoformat(v.strip())
            except ValueError:
                pass
        raise ValueError(f"expected an ISO 8601 date, got {_kind(v)} {v!r}")

    return coerce


def _time(_: Column) -> Coercer:
    def coerce(v: Any) -> dt.time:
        if isinstance(v, dt.time):
            return v
        if isinstance(v, str):
            try:
                return dt.time.fromisoformat(v.strip())
            except ValueError:
                pass
        raise ValueError(f"expected an ISO 8601 time, got {_kind(v)} {v!r}")

    return coerce


def _json(_: Column) -> Coercer:
    def coerce(v: Any) -> str:
        if isinstance(v, str):
            try:
                json.loads(v)
            except ValueError:
                raise ValueError(f"is not valid JSON text: {v[:40]!r}") from None
            return v
        try:
            # Decimal (exactly decoded JSON numbers) stays a number, not a string
            return simplejson.dumps(v, separators=(",", ":"), default=str, use_decimal=True)
        except (TypeError, ValueError) as err:
            raise ValueError(f"cannot be written as JSON: {err}") from None

    return coerce


def _bytea(_: Column) -> Coercer:
    def coerce(v: Any) -> bytes:
        if isinstance(v, bytes | bytearray | memoryview):
            return bytes(v)
        if isinstance(v, str):
            try:
                if v.startswith("\\x"):
                    return bytes.fromhex(v[2:])
                return base64.b64decode(v, validate=True)
            except (ValueError, binascii.Error):
                pass
        raise ValueError("expected bytes (base64 or \\x hex text)")

    return coerce


def _passthrough(col: Column) -> Coercer:
    """Types dx has no rule for travel as their text form; PostgreSQL has the last word (a
    rejection then fails the event alone through the batch bisection)."""

    def coerce(v: Any) -> str:
        if isinstance(v, str):
            if "\x00" in v:
                raise ValueError("contains a NUL character")
            return v
        if isinstance(v, dict | list):
            return simplejson.dumps(v, default=str, use_decimal=True)
        return str(v)

    return coerce


_BY_TYPE: dict[str, Callable[[Column], Coercer]] = {
    "int2": _int, "int4": _int, "int8": _int, "oid": _int,
    "numeric": _numeric, "float4": _float, "float8": _float, "bool": _bool,
    "uuid": _uuid, "timestamp": _timestamp, "timestamptz": _timestamp, "date": _date,
    "time": _time, "json": _json, "jsonb": _json, "bytea": _bytea,
    **{t: _text for t in _TEXT},
}


def scalar_coercer(col: Column) -> Coercer:
    if col.category == "E":
        return _enum(col)
    return _BY_TYPE.get(col.type, _passthrough)(col)


def coercer(col: Column) -> Coercer:
    """The coercer of a column (element-wise for arrays). None is handled by the caller."""
    one = scalar_coercer(col)
    if not col.is_array:
        return one

    def coerce(v: Any) -> list[Any]:
        if isinstance(v, str):
            try:
                v = json.loads(v)
            except ValueError:
                raise ValueError("expected an array (a list, or JSON array text)") from None
        if not isinstance(v, list | tuple):
            raise ValueError(f"expected an array, got {_kind(v)}")
        return [None if x is None else one(x) for x in v]

    return coerce


class RowValidator:
    """Turns a producer's record (field -> value) into a target row (column -> value).

    Unknown fields fail the event (a renamed or misspelt field would otherwise drop data
    silently) unless the route lists them in ``ignore_fields``.
    """

    def __init__(self, route: SourceRoute, target: Target, *, empty_is_null: bool = False):
        self.route = route
        self.target = target
        self.empty_is_null = empty_is_null
        self.coercers = {name: coercer(col) for name, col in target.columns.items()}
        self.ignore = frozenset(route.ignore_fields)
        self.required = tuple(
            name for name, col in target.columns.items() if col.not_null and not col.has_default
        )
        self._column_of: dict[str, str] = {}
        for name in target.columns:
            self._column_of[route.field_for(name)] = name

    def field(self, column: str) -> str:
        return self.route.field_for(column)

    def _value(self, column: str, field: str, v: Any) -> Any:
        if v is None or (self.empty_is_null and v == ""):
            if self.target.columns[column].not_null:
                raise FieldError(field, f"is null but column {column!r} is NOT NULL")
            return None
        try:
            return self.coercers[column](v)
        except ValueError as err:
            raise FieldError(field, str(err)) from None

    def row(self, record: Mapping[str, Any], *, full: bool = True) -> dict[str, Any]:
        """Columns of an upsert. ``full`` requires every NOT NULL column without a default
        (an INSERT ... ON CONFLICT checks them before it knows the row exists)."""
        out: dict[str, Any] = {}
        for field, v in record.items():
            column = self._column_of.get(field)
            if column is None:
                if field in self.ignore:
                    continue
                if field in self.route.fields or field in self.target.columns:
                    raise FieldError(field, "is not a field of this route (the column is "
                                            "written from another, renamed field)")
                raise FieldError(field, f"unknown field (not a writable column of "
                                        f"{self.target.qualified})")
            out[column] = self._value(column, field, v)
        if full:
            for column in self.required:
                if column not in out:
                    raise FieldError(self.field(column),
                                     f"is missing but column {column!r} is NOT NULL")
        for column in self.target.key:
            if out.get(column) is None:
                raise FieldError(self.field(column), "key field is missing")
        if self.target.version is not None and out.get(self.target.version) is None:
            raise FieldError(self.field(self.target.version),
                             "version field is missing (the route's conflict policy needs it)")
        return out

    def key(self, record: Mapping[str, Any]) -> tuple[Any, ...]:
        """The key of a delete, from a key record or the ``before`` image (extra fields are
        allowed there: a Debezium ``before`` carries the whole row)."""
        out = []
        for column in self.target.key:
            field = self.field(column)
            if field not in record or record[field] is None:
                raise FieldError(field, "key field is missing")
            out.append(self._value(column, field, record[field]))
        return tuple(out)

    def key_of_row(self, row: Mapping[str, Any]) -> tuple[Any, ...]:
        return tuple(row[c] for c in self.target.key)
