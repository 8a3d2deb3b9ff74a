"""``{path}`` templates, shared by route mappings and connector settings (URLs, file names).

The language is the one documented in ``pipeline/config/sinks.py``: a placeholder names a source
path, ``{{``/``}}`` are literal braces, nothing else. Templates are parsed once (at load time for
validation, again when a worker starts) into a list of literal and path parts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pipeline.config.sinks import _PLACEHOLDER, template_paths

Part = tuple[bool, str]  # (is_path, text)


def parse(template: str) -> list[Part]:
    template_paths(template)  # raises ValueError on a bad template
    parts: list[Part] = []
    pos = 0
    for m in _PLACEHOLDER.finditer(template):
        if m.start() > pos:
            parts.append((False, template[pos:m.start()]))
        tok = m.group(0)
        if tok in ("{{", "}}"):
            parts.append((False, tok[0]))
        else:
            parts.append((True, m.group(1).strip()))
        pos = m.end()
    if pos < len(template):
        parts.append((False, template[pos:]))
    return parts


def render(parts: list[Part], resolve: Callable[[str], Any],
           quote: Callable[[str], str] | None = None) -> str:
    """Join the parts; a null value renders as empty text; ``quote`` escapes values (URLs)."""
    out: list[str] = []
    for is_path, text in parts:
        if not is_path:
            out.append(text)
            continue
        value = resolve(text)
        s = "" if value is None else (str(value).lower() if isinstance(value, bool) else str(value))
        out.append(quote(s) if quote else s)
    return "".join(out)


def dig(obj: Any, dotted: str) -> Any:
    """``a.b.c`` through nested mappings; None when any step is missing."""
    for part in dotted.split("."):
        if not isinstance(obj, dict):
            return None
        obj = obj.get(part)
    return obj


def record_resolver(record: Any) -> Callable[[str], Any]:
    """Resolve template paths against a delivered :class:`~connectors.base.Record`: plain names
    read the mapped payload, ``$key.x`` the key, ``$op`` etc. the event metadata."""

    def resolve(path: str) -> Any:
        if path.startswith("$key."):
            return dig(record.key, path[5:])
        if path.startswith(("$after.", "$before.")):
            return dig(record.payload or {}, path.split(".", 1)[1])
        if path.startswith("$"):
            return {"$op": record.op, "$event_id": record.event_id, "$origin": record.origin,
                    "$table": record.table, "$topic": record.topic, "$ts_ms": record.ts_ms,
                    "$schema": record.table.split(".", 1)[0] if "." in record.table else None,
                    "$source_ts_ms": record.ts_ms}.get(path)
        return dig(record.payload or {}, path)

    return resolve
