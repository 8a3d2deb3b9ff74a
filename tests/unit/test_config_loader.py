"""dx.yaml loading: every error names file, line and key; secrets only from the environment."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config.loader import load_config, parse_config
from pipeline.errors import ConfigError

BASE = """\
database:
  url: ${DB_URL}
kafka:
  bootstrap_servers: localhost:9092
  topic_prefix: shop
schema_registry:
  url: http://localhost:8081
tables:
  - name: public.products
    columns: [id, sku]
"""
ENV = {"DB_URL": "postgresql://u:p@h/db"}


def test_valid_config_and_defaults() -> None:
    cfg = parse_config(BASE, env=ENV)
    assert cfg.database.url.get_secret_value() == "postgresql://u:p@h/db"
    assert "p@h" not in repr(cfg.database)  # SecretStr never prints the secret
    assert cfg.relay.mode == "exactly-once"
    assert cfg.topic_for(cfg.tables[0]) == "shop.public.products"
    assert cfg.where("tables", 0, "columns") == ("dx.yaml", 10)


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        (BASE.replace("topic_prefix: shop", "topic_prefx: shop"), 5,
         "kafka.topic_prefx: unknown key 'topic_prefx'; allowed: bootstrap_servers"),
        (BASE.replace("columns: [id, sku]", "columns: []"), 10, "tables[0].columns"),
        (BASE.replace("columns: [id, sku]", "columns: [id, id]"), 10, "must be unique"),
        (BASE + "relay:\n  mode: sometimes\n", 12, "relay.mode"),
        (BASE.replace("  topic_prefix: shop", "  topic_prefix: 'a b'"), 5, "topic_prefix"),
        ("database: [\n", 2, "not valid YAML"),
        (BASE + "database: {}\n", 11, "duplicate key 'database'"),
    ],
)
def test_errors_name_file_and_line(text: str, line: int, fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(text, file="conf/dx.yaml", env=ENV)
    assert str(err.value).startswith(f"conf/dx.yaml:{line}: ")
    assert fragment in str(err.value)


def test_missing_environment_variable_names_it() -> None:
    with pytest.raises(ConfigError, match=r"dx.yaml:2: environment variable DB_URL is not set"):
        parse_config(BASE, env={})


def test_default_and_escape_in_interpolation() -> None:
    text = BASE.replace("${DB_URL}", "${NOPE:-postgresql://x/y}").replace(
        "http://localhost:8081", "http://h/$${literal}")
    cfg = parse_config(text, env={})
    assert cfg.database.url.get_secret_value() == "postgresql://x/y"
    assert cfg.schema_registry.url == "http://h/${literal}"


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read configuration"):
        load_config(tmp_path / "missing.yaml")
