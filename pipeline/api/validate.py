"""Request bodies -> column values, with every problem reported at its JSON path.

Values go through the same coercers as inbound events (``pipeline.source.validate``: integer
ranges, numeric precision and scale, varchar lengths, enum labels, UUIDs, ISO dates...), after a
strict JSON-type check (an API client sends ``12``, not ``"12"``, where the OpenAPI document says
integer), and then through the field's own rules from dx.yaml (each field's check is composed once:
``pipeline.api.checks``). All problems of a request are collected, not just the first, so a batch
of 1,000 rows with 3 bad ones gets 3 precise errors.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pipeline.api.catalog import Entity
from pipeline.api.checks import Invalid, json_name
from pipeline.api.errors import Problem, join_path

Mode = Literal["create", "replace", "update"]


def validate_item(entity: Entity, item: Any, mode: Mode, path: str,
                  url_key: Mapping[str, Any] | None = None) -> tuple[dict[str, Any],
                                                                    list[Problem]]:
    """Field values (public name -> coerced value) of one body item, and its problems.

    ``create`` refuses non-creatable fields and requires the required ones; ``replace`` (PUT)
    requires the required editable ones and leaves (non-)editability to the store, which knows
    whether the row exists; ``update`` (PATCH) takes any subset. Key fields given in the body must
    equal ``url_key`` when the URL names the row.
    """
    problems: list[Problem] = []
    if not isinstance(item, dict):
        return {}, [Problem("bad_body", f"expected an object, got {json_name(item)}",
                            path or None)]
    values: dict[str, Any] = {}
    fields = entity.fields
    for name, v in item.items():
        f = fields.get(name)
        if f is None:
            problems.append(Problem("unknown_field", f"{entity.alias} has no field {name!r}",
                                    join_path(path, name)))
            continue
        if mode == "create" and not f.rule.creatable:
            problems.append(Problem("not_creatable", f"{name} is set by the server",
                                    join_path(path, name)))
            continue
        try:
            value = f.check(v)
        except Invalid as bad:
            at = join_path(path, name)
            problems.append(Problem(bad.code, bad.message,
                                    at if bad.index is None else join_path(at, bad.index)))
            continue
        if url_key is not None and name in url_key and value != url_key[name]:
            problems.append(Problem("key_mismatch", f"{name} differs from the id in the URL",
                                    join_path(path, name)))
            continue
        values[name] = value
    if mode in ("create", "replace"):
        for f in entity.required:
            # replace: a non-editable field is only needed when PUT creates (the store checks)
            if mode == "replace" and not f.rule.editable:
                continue
            if f.name not in item and (url_key is None or f.name not in url_key):
                problems.append(Problem("required", f"{f.name} is required",
                                        join_path(path, f.name)))
    return values, problems


def batch_items(body: Any) -> tuple[list[Any], bool, list[Problem]]:
    """(items, is_batch, problems) of a write body: one object, or ``{"data": [objects]}``."""
    if isinstance(body, dict) and set(body) == {"data"}:
        data = body["data"]
        if not isinstance(data, list):
            return [], True, [Problem("bad_body", "'data' must be an array of objects", "data")]
        if not data:
            return [], True, [Problem("bad_body", "'data' is empty", "data")]
        return data, True, []
    if isinstance(body, dict):
        return [body], False, []
    return [], False, [Problem("bad_body", "expected a JSON object or {\"data\": [...]}")]


def item_path(batch: bool, index: int) -> str:
    return f"data[{index}]" if batch else ""
