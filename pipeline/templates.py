"""dx's two small template languages, in one place below the configuration that uses them.

``${VAR}`` (dx.yaml, applied while the file is loaded): ``${VAR}`` is the environment variable,
``${VAR:-default}`` falls back to ``default``, ``$$`` is a literal ``$``. It is how secrets stay
out of the file. :func:`expand_env`.

``{path}`` (route mappings, connector settings such as URLs and file names, applied per event):
a placeholder names a *source path*, ``{{``/``}}`` are literal braces, nothing else — no
expressions on purpose: computation belongs in the target. Source paths: ``name`` reads the
current row (``after``; ``before`` for deletes); ``$after.x``, ``$before.x`` and ``$key.x`` read
a specific image; ``$op``, ``$event_id``, ``$origin``, ``$table``, ``$schema``, ``$topic``,
``$ts_ms`` and ``$source_ts_ms`` read event metadata. Templates are checked when dx.yaml loads
(:func:`template_paths`), parsed once when a worker starts (:func:`parse`) and rendered per event
(:func:`render`) with a resolver (:func:`record_resolver` for a delivered record).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

# -- ${VAR} ---------------------------------------------------------------------------------

_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class MissingVariable(ValueError):
    """``${NAME}`` names a variable that is not set and has no default."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"environment variable {name} is not set "
                         f"(use ${{{name}:-default}} for a default)")


def expand_env(text: str, env: Mapping[str, str]) -> str:
    """``text`` with every ``${VAR}``, ``${VAR:-default}`` and ``$$`` replaced."""
    def sub(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, default = match.group(1), match.group(2)
        if name in env:
            return env[name]
        if default is not None:
            return default
        raise MissingVariable(name)

    return _VAR.sub(sub, text)


# -- {path} ---------------------------------------------------------------------------------

IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_PATH = re.compile(
    rf"^(?:\$(?:op|event_id|origin|table|schema|topic|ts_ms|source_ts_ms)"
    rf"|\$(?:after|before|key)\.{IDENT}(?:\.{IDENT})*"
    rf"|{IDENT}(?:\.{IDENT})*)$"
)
_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")

Part = tuple[bool, str]  # (is_path, text)


def check_path(v: str) -> str:
    """``v`` if it is a source path (see the module docstring); ValueError otherwise."""
    if not _PATH.match(v):
        raise ValueError(
            f"{v!r} is not a source path; use a column name, $after.col, $before.col, "
            "$key.col or one of $op, $event_id, $origin, $table, $schema, $topic, $ts_ms, "
            "$source_ts_ms"
        )
    return v


def parse(template: str) -> list[Part]:
    """The template as literal and path parts; ValueError on unbalanced braces or bad paths.

    ``{path}`` is replaced by the value at ``path`` (empty text when null); ``{{`` and ``}}`` are
    literal braces."""
    parts: list[Part] = []
    pos = 0
    for m in _PLACEHOLDER.finditer(template):
        if m.start() > pos:
            parts.append((False, template[pos:m.start()]))
        tok = m.group(0)
        if tok in ("{{", "}}"):
            parts.append((False, tok[0]))
        elif m.group(1) is None:
            raise ValueError(f"unbalanced {tok!r} in template {template!r} (write {tok * 2} "
                             "for a literal brace)")
        else:
            parts.append((True, check_path(m.group(1).strip())))
        pos = m.end()
    if pos < len(template):
        parts.append((False, template[pos:]))
    return parts


def template_paths(template: str) -> list[str]:
    """The source paths a template reads; ValueError on unbalanced braces or bad paths."""
    return [text for is_path, text in parse(template) if is_path]


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
