"""Entity definitions from the console page: problems are named by the field they are about,
before anything touches the database."""

from __future__ import annotations

from typing import Any

from pipeline.config.model import DxConfig
from pipeline.console.entities import check, parse_scopes


def config(entities: list[dict[str, Any]] | None = None) -> DxConfig:
    return DxConfig.model_validate({
        "database": {"url": "postgresql://x@127.0.0.1:9/x"},
        "kafka": {"bootstrap_servers": "127.0.0.1:9"},
        "schema_registry": {"url": "http://127.0.0.1:9"},
        "api": {"entities": entities or []}})


def test_model_problems_carry_the_field_path() -> None:
    entity, problems = check(None, config(), "brands",  # type: ignore[arg-type]
                             "table: brands\nfields:\n  title: {max_length: -1}\n")
    assert entity is None
    assert [p.where for p in problems] == ["fields.title.max_length"]


def test_not_yaml_and_not_a_mapping_are_one_problem_each() -> None:
    for text in ("table: [", "- a list"):
        entity, problems = check(None, config(), "brands", text)  # type: ignore[arg-type]
        assert entity is None and len(problems) == 1 and problems[0].where == ""


def test_a_name_of_dx_yaml_is_refused() -> None:
    cfg = config([{"alias": "brands", "table": "brands", "fields": {"id": {}}}])
    entity, problems = check(None, cfg, "brands",  # type: ignore[arg-type]
                             "table: brands\nfields:\n  id: {}\n")
    assert entity is None and problems[0].where == "alias" and "dx.yaml" in problems[0].message


def test_scopes_are_written_one_entity_a_line() -> None:
    assert parse_scopes("brands: read, write\n*: read\n") == {"brands": ["read", "write"],
                                                             "*": ["read"]}
