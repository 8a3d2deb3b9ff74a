"""The two template languages of pipeline/templates.py: ${VAR} in dx.yaml, {path} per event."""

from __future__ import annotations

from urllib.parse import quote

import pytest

from pipeline.templates import (
    MissingVariable,
    dig,
    expand_env,
    parse,
    render,
    template_paths,
)


def test_env_variables_defaults_and_dollars() -> None:
    env = {"HOST": "db", "EMPTY": ""}
    assert expand_env("${HOST}:${PORT:-5432}/$${HOST}", env) == "db:5432/${HOST}"
    assert expand_env("x${EMPTY:-fallback}y", env) == "xy"  # set but empty is set
    with pytest.raises(MissingVariable, match=r"PASSWORD is not set \(use \$\{PASSWORD:-"):
        expand_env("${PASSWORD}", env)


def test_path_templates_parse_render_and_refuse() -> None:
    parts = parse("/orders/{$key.id}/{{raw}}/{ status }")
    assert template_paths("/orders/{$key.id}/{{raw}}/{ status }") == ["$key.id", "status"]
    values = {"$key.id": "a/b", "status": None}
    assert render(parts, values.get, quote=lambda s: quote(s, safe="")) == "/orders/a%2Fb/{raw}/"
    assert render(parse("{flag}"), {"flag": True}.get) == "true"
    with pytest.raises(ValueError, match="unbalanced '}'"):
        parse("a}b")
    with pytest.raises(ValueError, match="is not a source path"):
        parse("{1x}")
    assert dig({"a": {"b": 1}}, "a.b") == 1 and dig({"a": 1}, "a.b") is None
