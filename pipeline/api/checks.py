"""One field's value check (JSON type, the field's dx.yaml rules, the column's coercer), composed
once per field from only the steps its rules need, so a request runs a short function per value
instead of re-deciding from the field's settings every time. ``pipeline.api.validate`` applies
them to request bodies and reports problems at their JSON paths.

Steps, in order (the first failing one is the value's problem): null (``null_not_allowed``), the
JSON type (``wrong_type``; an array's elements too), for strings the length (``max_length``,
``min_length``) and ``pattern``, the column's coercer (``wrong_type`` with its reason), then
``min_value``, ``max_value`` and ``enum`` on the coerced value.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from decimal import Decimal
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.api.catalog import Field

#: A value -> its column value; raises :class:`Invalid`.
Check = Callable[[Any], Any]


class Invalid(Exception):
    """A value's problem: its code, message, and the array element it is about (if one)."""

    def __init__(self, code: str, message: str, index: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.index = index


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float | Decimal) and not isinstance(v, bool) and (
        not isinstance(v, float) or math.isfinite(v))


def _any(v: Any) -> bool:
    return True


_KIND_OK: dict[str, Callable[[Any], bool]] = {
    "any": _any,
    "integer": _is_int,
    "number": _is_number,
    "boolean": lambda v: isinstance(v, bool),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
}


def json_name(v: Any) -> str:
    """The JSON type of a decoded value, for messages."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int):
        return "integer"
    if isinstance(v, float | Decimal):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, list):
        return "array"
    return "object"


def _num(x: float) -> str:
    return str(int(x)) if x == int(x) else str(x)


def compile_check(f: Field) -> Check:
    """The check of field ``f``."""
    name, not_null, kind, element_kind = f.name, f.column.not_null, f.kind, f.element_kind
    kind_ok, element_ok = _KIND_OK[kind], _KIND_OK[element_kind]
    limit, min_length, pattern = f.text_limit, f.rule.min_length, f.pattern
    strings = limit is not None or min_length is not None or pattern is not None
    coerce, low, high, enum = f.coerce, f.rule.min_value, f.rule.max_value, f.enum
    after = low is not None or high is not None or enum is not None

    def string_rules(v: str) -> None:
        if limit is not None and len(v) > limit:
            raise Invalid("max_length", f"is {len(v)} characters long; at most {limit} allowed")
        if min_length is not None and len(v) < min_length:
            raise Invalid("min_length", f"is {len(v)} characters long; at least {min_length} "
                                        "required")
        if pattern is not None and not pattern.search(v):
            raise Invalid("pattern", f"does not match {pattern.pattern}")

    def value_rules(v: Any, value: Any) -> None:
        if low is not None and value < low:
            raise Invalid("min_value", f"{v} is less than {_num(low)}")
        if high is not None and value > high:
            raise Invalid("max_value", f"{v} is greater than {_num(high)}")
        if enum is not None and value not in enum:
            allowed = ", ".join(str(x) for x in enum)
            raise Invalid("enum", f"{v!r} is not one of {allowed}")

    def check(v: Any) -> Any:
        if v is None:
            if not_null:
                raise Invalid("null_not_allowed", f"{name} cannot be null")
            return None
        if not kind_ok(v):
            raise Invalid("wrong_type", f"expected {kind}, got {json_name(v)}")
        if kind == "array":
            for i, x in enumerate(v):
                if x is not None and not element_ok(x):
                    raise Invalid("wrong_type", f"expected {element_kind}, got {json_name(x)}",
                                  i)
        if strings and isinstance(v, str):
            string_rules(v)
        try:
            value = coerce(v)
        except ValueError as err:
            raise Invalid("wrong_type", str(err)) from None
        if after:
            value_rules(v, value)
        return value

    return check
