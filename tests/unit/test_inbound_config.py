"""sources[].inbound: configuration errors with file and line, secrets from the environment, the
webhook signature check, the mapping (the sink mapping language) and deterministic event ids."""

from __future__ import annotations

import hashlib
import hmac
from types import SimpleNamespace

import httpx
import pytest

from pipeline.api.errors import ApiError
from pipeline.config.auth import ReceivedHmac
from pipeline.config.loader import parse_config
from pipeline.errors import ConfigError
from pipeline.inbound.entities import Mapper, MappingError, event_id
from pipeline.inbound.pull import _larger
from pipeline.inbound.webhook import _body_items, check_signature

BASE = """\
database:
  url: postgresql://h/db
kafka:
  bootstrap_servers: localhost:9092
schema_registry:
  url: http://localhost:8081
sources:
  - name: pim
    topic: pim.products
    format: json
    table: products
    inbound:
      id_fields: [id, version]
      mapping:
        fields:
          id: id
          name: title
          weight_g: {from: attributes.weight, type: int}
      webhook:
        auth: {kind: hmac, secret: "${HOOK_SECRET}"}
      pull:
        url: https://pim.example/api/products
        items: data
        auth: {kind: oauth2, token_url: "https://pim.example/token", client_id: dx,
               client_secret: "${PIM_SECRET}"}
        pagination: {kind: cursor, token_path: meta.next}
        incremental: {param: updated_since, field: updated_at}
      files: {directory: /var/dx/pim}
"""
ENV = {"HOOK_SECRET": "hook-secret", "PIM_SECRET": "pim-secret"}


def test_inbound_config_loads_with_secrets_from_the_environment() -> None:
    cfg = parse_config(BASE, env=ENV)
    inbound = cfg.sources[0].inbound
    assert inbound is not None and inbound.kinds() == ["webhook", "pull", "files"]
    assert inbound.webhook is not None and isinstance(inbound.webhook.auth, ReceivedHmac)
    assert inbound.webhook.auth.secret.get_secret_value() == "hook-secret"
    assert "hook-secret" not in repr(cfg) and "pim-secret" not in repr(cfg)
    assert inbound.pull is not None and inbound.pull.pagination.parameter == "cursor"
    assert inbound.files is not None and inbound.files.formats == ["csv", "jsonl"]


@pytest.mark.parametrize(
    ("old", "new", "line", "fragment"),
    [
        ("    format: json\n", "", 8, "inbound (webhook, pull, files) produces JSON"),
        ("token_path: meta.next", "param: after", 26, "cursor pagination needs token_path"),
        ("        items: data\n", "        itmes: data\n", 23, "unknown key 'itmes'; allowed:"),
        ("url: https://pim", "url: ftp://pim", 22, "must start with http:// or https://"),
        ('{kind: hmac, secret: "${HOOK_SECRET}"}', "{kind: hmac}", 20, "secret"),
        ("{from: attributes.weight, type: int}", "{from: attributes.weight, type: money}", 18,
         "type"),
        ("field: updated_at}", "field: updated_at, keyset: true}", 21,
         "keyset needs page or offset pagination"),
    ])
def test_inbound_config_errors_name_file_and_line(old: str, new: str, line: int,
                                                  fragment: str) -> None:
    assert old in BASE
    with pytest.raises(ConfigError) as err:
        parse_config(BASE.replace(old, new), file="dx.yaml", env=ENV)
    assert err.value.line == line, str(err.value)
    assert fragment in str(err.value)


def test_a_missing_secret_variable_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="HOOK_SECRET is not set"):
        parse_config(BASE, env={"PIM_SECRET": "x"})


def _sig(secret: str, ts: int, body: bytes) -> str:
    return hmac.new(secret.encode(), f"{ts}.".encode() + body, hashlib.sha256).hexdigest()


def test_signature_check_constant_time_window_and_rotation() -> None:
    auth = ReceivedHmac.model_validate({"kind": "hmac", "secret": "k", "tolerance_s": 60})
    body = b'{"id": 1}'
    check_signature(auth, f"t=1000,v1={_sig('k', 1000, body)}", body, now=1030)
    check_signature(auth, f"t=1000,v1=00ff,v1={_sig('k', 1000, body)}", body, now=1000)
    for header, now, why in [
        (f"t=1000,v1={_sig('k', 1000, body)}", 1061, "window"),
        (f"t=1000,v1={_sig('k', 1000, body)}", 939, "window"),
        (f"t=1000,v1={_sig('other', 1000, body)}", 1000, "does not match"),
        (f"t=1001,v1={_sig('k', 1000, body)}", 1000, "does not match"),
        (f"v1={_sig('k', 1000, body)}", 1000, "t=<unix seconds>"),
        (None, 1000, "missing"),
    ]:
        with pytest.raises(ApiError, match=why) as err:
            check_signature(auth, header, body, now=now)
        assert err.value.status == 401


def test_body_shapes() -> None:
    assert _body_items({"id": 1}) == [{"id": 1}]
    assert _body_items([{"id": 1}, {"id": 2}]) == [{"id": 1}, {"id": 2}]
    assert _body_items({"data": [{"id": 1}]}) == [{"id": 1}]
    for bad, path in [([], None), ({"data": 3}, "data"), ([{"id": 1}, 2], "[1]"), ("x", None),
                      ({"data": [1]}, "data[0]")]:
        with pytest.raises(ApiError) as err:
            _body_items(bad)
        assert err.value.status == 400 and err.value.problems[0].path == path


def test_mapping_reuses_the_sink_language_and_event_ids_are_deterministic() -> None:
    cfg = parse_config(BASE, env=ENV)
    mapper = Mapper("pim", cfg.sources[0].inbound)
    record = mapper({"id": 7, "title": "Lamp", "attributes": {"weight": "1200"}, "x": 1})
    assert record == {"id": 7, "name": "Lamp", "weight_g": 1200}
    with pytest.raises(MappingError, match="mapping weight_g: cannot convert 'heavy' to int"):
        mapper({"id": 7, "attributes": {"weight": "heavy"}})
    assert Mapper("pim", None)({"a": 1}) == {"a": 1}
    a = event_id("pim", {"id": 1, "version": 2, "name": "x"}, ["id", "version"])
    assert a == event_id("pim", {"id": 1, "version": 2, "name": "y"}, ["id", "version"])
    assert a != event_id("pim", {"id": 1, "version": 3, "name": "x"}, ["id", "version"])
    assert a != event_id("erp", {"id": 1, "version": 2, "name": "x"}, ["id", "version"])
    assert event_id("pim", {"b": 1, "a": 2}, None) == event_id("pim", {"a": 2, "b": 1}, None)


def test_incremental_watermark_orders_text_or_numbers() -> None:
    assert _larger(None, "2024-01-02T00:00:00Z", "text") == "2024-01-02T00:00:00Z"
    assert _larger("2024-01-02", "2024-01-10", "text") == "2024-01-10"
    assert _larger("9", 10, "number") == "10"
    assert _larger("10", "9", "number") == "10"
    assert _larger("10", None, "number") == "10"


def _pull(pagination: dict[str, object], **extra: object) -> SimpleNamespace:
    from pipeline.config.inbound import PullConfig

    return SimpleNamespace(pull=PullConfig.model_validate(
        {"url": "https://pim.example/p", "params": {"lang": "en"}, "pagination": pagination,
         **extra}))


def test_pagination_kinds_request_and_next_position() -> None:
    from pipeline.inbound.pull import Cursor, Puller

    resp = httpx.Response(200, request=httpx.Request("GET", "https://pim.example/p?x=1"),
                          headers={"Link": '<https://pim.example/p?page=9>; rel="next"'})
    inc = {"incremental": {"param": "since", "field": "ts"}}
    page = _pull({"kind": "page", "size_param": "limit", "size": 2}, **inc)
    c = Cursor(since="2024-01-01", next=1)
    assert Puller._request(page, c) == ("https://pim.example/p", {
        "lang": "en", "since": "2024-01-01", "limit": 2, "page": 1})
    assert Puller._next(page, c, {}, [1, 2], resp) == 2
    assert Puller._next(page, c, {}, [1], resp) is None  # a short page is the last
    offset = _pull({"kind": "offset", "param": "skip", "size_param": "take", "size": 2})
    c = Cursor(next=4)
    assert Puller._request(offset, c)[1] == {"lang": "en", "take": 2, "skip": 4}
    assert Puller._next(offset, c, {}, [1, 2], resp) == 6
    cursor = _pull({"kind": "cursor", "token_path": "meta.after", "param": "after"})
    assert "after" not in Puller._request(cursor, Cursor())[1]  # the first page: no token
    assert Puller._request(cursor, Cursor(next="tok"))[1]["after"] == "tok"
    assert Puller._next(cursor, Cursor(), {"meta": {"after": "t2"}}, [1], resp) == "t2"
    assert Puller._next(cursor, Cursor(), {"meta": {"after": None}}, [1], resp) is None
    nxt = _pull({"kind": "next", "token_path": "links.next"})
    assert Puller._next(nxt, Cursor(), {"links": {"next": "/p?page=2"}}, [1], resp) == \
        "https://pim.example/p?page=2"  # relative to the page's URL
    assert Puller._request(nxt, Cursor(next="https://pim.example/p?page=2")) == (
        "https://pim.example/p?page=2", {})
    link = _pull({"kind": "next"})
    assert Puller._next(link, Cursor(), {}, [1], resp) == "https://pim.example/p?page=9"
    assert Puller._next(_pull({"kind": "none"}), Cursor(), {}, [1], resp) is None


def test_pull_auth_headers_reuse_the_http_connector() -> None:
    from connectors.http.connector import auth_headers
    from pipeline.config.auth import ApiKeyAuth, BasicAuth

    key = ApiKeyAuth.model_validate({"kind": "api_key", "key": "k1", "header": "X-Key"})
    assert auth_headers(key, None, b"") == {"X-Key": "k1"}
    basic = BasicAuth.model_validate({"kind": "basic", "username": "u", "password": "p"})
    assert auth_headers(basic, None, b"") == {"Authorization": "Basic dTpw"}
