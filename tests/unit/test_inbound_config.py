"""sources[].inbound: configuration errors with file and line, secrets from the environment, the
webhook signature check, the mapping (the sink mapping language) and deterministic event ids."""

from __future__ import annotations

import hashlib
import hmac

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
