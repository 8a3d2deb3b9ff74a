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


CLIENTS = BASE.replace("  entities:\n", """\
  clients:
    - id: erp
      system: erp
      secret_env: ERP_SECRET
      scopes: {products: [read]}
      token_lifetime_s: 60
  entities:
""")


def test_clients_section() -> None:
    cfg = parse_config(CLIENTS, env={})
    check_references(cfg)
    c = cfg.api.clients[0]
    assert (c.id, c.secret_env, c.token_lifetime_s) == ("erp", "ERP_SECRET", 60)
    assert cfg.api.token_lifetime_s == 3600


@pytest.mark.parametrize(
    ("old", "new", "line", "fragment"),
    [
        ("token_lifetime_s: 60", "token_lifetime_s: 0", 18, "greater than or equal to 1"),
        ("token_lifetime_s: 60", "lifetime: 60", 18, "unknown key 'lifetime'"),
        ("secret_env: ERP_SECRET", "secret_env: $${ERP_SECRET}", 16, "the NAME of an"),
        ("      secret_env: ERP_SECRET\n", "", 14, "exactly one of secret_env"),
        ("scopes: {products: [read]}\n      token", "scopes: {products: [own]}\n      token",
         17, "scopes.products"),
        ("      token_lifetime_s: 60\n", "      admin: true\n", 18, "unknown key 'admin'"),
    ],
)
def test_client_shape_errors_name_the_line(old: str, new: str, line: int, fragment: str) -> None:
    assert old in CLIENTS
    with pytest.raises(ConfigError) as err:
        parse_config(CLIENTS.replace(old, new), file="dx.yaml", env={})
    assert str(err.value).startswith(f"dx.yaml:{line}: "), str(err.value)
    assert fragment in str(err.value)


@pytest.mark.parametrize(
    ("old", "new", "line", "fragment"),
    [
        ("    - id: erp\n", "    - id: pim\n", 14, "id 'pim' is used twice"),
        ("secret_env: ERP_SECRET", "secret_env: PIM_KEY", 14, "same secret"),
        ("scopes: {products: [read]}\n      token", "scopes: {prods: [read]}\n      token",
         17, "client 'erp': scope for unknown entity 'prods'"),
    ],
)
def test_client_reference_errors_name_the_line(old: str, new: str, line: int,
                                               fragment: str) -> None:
    cfg = parse_config(CLIENTS.replace(old, new), file="dx.yaml", env={})
    with pytest.raises(ConfigError) as err:
        check_references(cfg)
    assert str(err.value).startswith(f"dx.yaml:{line}: "), str(err.value)
    assert fragment in str(err.value)


def test_client_secrets_are_hashed_and_tokens_kept_as_hashes() -> None:
    from pipeline.api.oauth import ClientRing, TokenStore

    cfg = parse_config(CLIENTS, env={})
    ring = ClientRing(cfg.api, {"ERP_SECRET": "s3cret"})
    assert ring.authenticate("erp", "s3cret") is not None
    assert ring.authenticate("erp", "other") is None and ring.authenticate("x", "s3cret") is None
    assert "s3cret" not in repr(ring.__dict__)
    with pytest.raises(ConfigError, match="ERP_SECRET is not set"):
        ClientRing(cfg.api, {})
    client = ring.get("erp")
    assert client is not None
    store = TokenStore()
    token = store.issue(client, dict(client.principal.scopes))
    assert token.startswith("dxat_") and token not in repr(store.tokens)
    p = store.authenticate(token, ring)
    assert (p.id, p.kind, p.may("products", "read"), p.may("products", "write")) == (
        "erp", "client", True, False)
    assert store.retain(ClientRing(parse_config(BASE, env={}).api, {})) == 1
    with pytest.raises(ApiError) as err:
        store.authenticate(token, ring)
    assert err.value.status == 401


def test_scope_words_narrow_and_intersect() -> None:
    from pipeline.api.oauth import OAuthError, format_scopes, intersect, parse_scope

    allowed = {"*": frozenset({"read"}), "products": frozenset({"read", "write"})}
    aliases = {"products", "variants"}
    assert parse_scope("products:write  variants:read", allowed, aliases) == {
        "products": frozenset({"write"}), "variants": frozenset({"read"})}
    assert format_scopes(parse_scope("*:read", allowed, aliases)) == "*:read"
    for bad in ("variants:write", "*:write", "x:read", "products", "products:all", ""):
        with pytest.raises(OAuthError) as err:
            parse_scope(bad, allowed, aliases)
        assert err.value.error == "invalid_scope" and err.value.status == 400
    token = {"*": frozenset({"read", "write"})}
    assert intersect(token, allowed) == {"*": frozenset({"read"}),
                                         "products": frozenset({"read", "write"})}
    assert intersect({"variants": frozenset({"read"})}, {"products": frozenset({"read"})}) == {}
