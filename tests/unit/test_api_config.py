"""dx.yaml's api: section: unknown keys, bad rules and dangling references fail with file:line;
keys name environment variables (hashed at start), never hold secrets."""

from __future__ import annotations

import hashlib

import pytest

from pipeline.api.catalog import check_references
from pipeline.api.errors import ApiError
from pipeline.api.security import KeyRing, RateLimiter, presented_key
from pipeline.config.api import RateLimit
from pipeline.config.loader import parse_config
from pipeline.errors import ConfigError

BASE = """\
database:
  url: postgresql://u:p@h/db
kafka:
  bootstrap_servers: localhost:9092
schema_registry:
  url: http://localhost:8081
api:
  keys:
    - id: pim
      system: pim
      secret_env: PIM_KEY
      scopes: {products: [read, write]}
  entities:
    - alias: products
      table: products
      fields:
        id: {creatable: false, editable: false}
        sku: {max_length: 20, pattern: "^[A-Z]+$"}
      relations:
        variants: {entity: variants, on: {id: product_id}}
    - alias: variants
      table: variants
      fields:
        id: {}
        product_id: {}
"""


def test_valid_section() -> None:
    cfg = parse_config(BASE, env={})
    check_references(cfg)
    e = cfg.api.entities[0]
    assert e.qualified == "public.products" and e.fields["sku"].max_length == 20
    assert cfg.api.keys[0].secret_env == "PIM_KEY"
    assert cfg.api.max_limit == 500


@pytest.mark.parametrize(
    ("old", "new", "line", "fragment"),
    [
        ("sku: {max_length: 20", "sku: {max_len: 20", 18, "unknown key 'max_len'"),
        ("      table: products\n", "      table: products\n      colour: red\n", 16,
         "unknown key 'colour'"),
        ("alias: products", "alias: Products", 14, "lowercase"),
        ("alias: products", "alias: docs", 14, "reserved"),
        ('pattern: "^[A-Z]+$"', 'pattern: "(["', 18, "not a valid regular expression"),
        ("secret_env: PIM_KEY", "secret_env: $${PIM_KEY}", 11, "the NAME of an environment"),
        ("secret_env: PIM_KEY", "secret_sha256: abc", 11, "64 lowercase hex"),
        ("      secret_env: PIM_KEY\n", "", 9, "exactly one of secret_env"),
        ("scopes: {products: [read, write]}", "scopes: {products: [read, admin]}", 12,
         "scopes.products"),
        ("        product_id: {}", "        limit: {}", 23, "reserved"),
        ("id: {creatable: false, editable: false}", "id: {creatable: false, required: true}",
         17, "must be creatable"),
    ],
)
def test_shape_errors_name_the_line(old: str, new: str, line: int, fragment: str) -> None:
    assert old in BASE
    with pytest.raises(ConfigError) as err:
        parse_config(BASE.replace(old, new), file="dx.yaml", env={})
    assert str(err.value).startswith(f"dx.yaml:{line}: "), str(err.value)
    assert fragment in str(err.value)


@pytest.mark.parametrize(
    ("old", "new", "line", "fragment"),
    [
        ("entity: variants", "entity: variantz", 20, "no entity with alias 'variantz'"),
        ("on: {id: product_id}", "on: {id: parent}", 20, "'parent' is not a field of"),
        ("scopes: {products:", "scopes: {prods:", 12, "unknown entity 'prods'"),
        ("alias: variants", "alias: products", 21, "used twice"),
    ],
)
def test_reference_errors_name_the_line(old: str, new: str, line: int, fragment: str) -> None:
    cfg = parse_config(BASE.replace(old, new), file="dx.yaml", env={})
    with pytest.raises(ConfigError) as err:
        check_references(cfg)
    assert str(err.value).startswith(f"dx.yaml:{line}: "), str(err.value)
    assert fragment in str(err.value)


def test_keys_are_hashed_and_compared_by_hash() -> None:
    cfg = parse_config(BASE, env={})
    ring = KeyRing(cfg.api, {"PIM_KEY": "s3cret"})
    assert ring.authenticate("s3cret").system == "pim"
    assert "s3cret" not in repr(ring.__dict__)
    assert hashlib.sha256(b"s3cret").hexdigest() in ring._by_hash
    with pytest.raises(ApiError) as err:
        ring.authenticate("other")
    assert err.value.status == 401
    with pytest.raises(ConfigError, match="PIM_KEY is not set"):
        KeyRing(cfg.api, {})
    assert presented_key({"authorization": "Bearer abc"}) == "abc"
    assert presented_key({"x-api-key": "k"}) == "k"


def test_rate_limiter_is_a_token_bucket() -> None:
    limiter = RateLimiter()
    rate = RateLimit(requests=2, per_s=10)
    assert [limiter.take("k", rate) == 0 for _ in range(3)] == [True, True, False]
    assert limiter.take("other", rate) == 0
