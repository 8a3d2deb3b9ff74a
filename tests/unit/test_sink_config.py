"""Sink route configuration: everything a route can get wrong is caught at load time, with the
file, line and key path of the mistake."""

from __future__ import annotations

import pytest

from connectors.http.configuration import HttpSettings
from pipeline.config.loader import parse_config
from pipeline.config.sinks import RetryPolicy
from pipeline.errors import ConfigError

HEAD = """database: {url: postgresql://x}
kafka: {bootstrap_servers: x}
schema_registry: {url: http://x}
sinks:
  - name: orders-to-erp
    topics: [dx.public.orders]
    target: erp
"""


def load(body: str):
    return parse_config(HEAD + body, env={"TOKEN": "s3cret"})


def error(body: str) -> str:
    with pytest.raises(ConfigError) as exc:
        load(body)
    return str(exc.value)


def test_full_route_loads_and_connector_settings_are_typed() -> None:
    cfg = load("""    filter:
      ops: [c, u]
      where:
        - {field: status, in: [paid, shipped]}
        - {field: total, gt: 10}
      exclude_origins: [wms]
    mapping:
      select: [id]
      fields:
        orderNo: number
        total: {from: total, type: float}
        customer.email: {from: email}
        channel: {const: web}
        label: {template: "{number}/{$op}"}
    connector:
      type: http
      url: http://erp.local/orders/{$key.id}
      auth: {kind: bearer, token: "${TOKEN}"}
    retry: {max_attempts: 3, backoff_base_s: 0.1}
    concurrency: 2
""")
    route = cfg.sinks[0]
    assert isinstance(route.connector, HttpSettings)
    assert route.connector.auth is not None
    assert route.connector.auth.token.get_secret_value() == "s3cret"  # type: ignore[union-attr]
    assert "s3cret" not in repr(route)
    assert route.dead_letter_topic("dx.public.orders") == "dx.public.orders.dlq"
    assert route.consumer_group == "dx-sink-orders-to-erp"
    assert route.filter.where[0].operator == "in"
    assert route.filter.where[1].operand == 10


def test_connector_error_points_at_the_nested_key_line() -> None:
    msg = error("""    connector:
      type: http
      url: http://erp.local/x
      timeout_s: soon
""")
    assert msg.startswith("dx.yaml:11: sinks[0].connector.timeout_s")


def test_unknown_connector_key_lists_allowed_keys() -> None:
    msg = error("""    connector:
      type: http
      url: http://erp.local/x
      retries: 3
""")
    assert "dx.yaml:11:" in msg and "unknown key 'retries'" in msg and "timeout_s" in msg


def test_unknown_connector_type_names_the_known_ones() -> None:
    msg = error("""    connector: {type: ftp}
""")
    assert "unknown connector 'ftp'" in msg and "http" in msg and "postgres" in msg


@pytest.mark.parametrize(("snippet", "expected"), [
    ("mapping: {fields: {x: {template: 'a {b'}}}", "unbalanced"),
    ("mapping: {fields: {x: {from: '$nope'}}}", "not a source path"),
    ("mapping: {fields: {x: {from: a, const: 1}}}", "exactly one"),
    ("mapping: {fields: {x: {from: a, type: money}}}", "Input should be"),
    ("mapping: {fields: {a: b, a.c: d}}", "both a value and the object"),
    ("filter: {where: [{field: a, gt: 1, lt: 3}]}", "exactly one operator"),
    ("filter: {ops: [x]}", "Input should be"),
])
def test_bad_mapping_or_filter_is_rejected_at_load(snippet: str, expected: str) -> None:
    msg = error(f"    {snippet}\n    connector: {{type: http, url: 'http://x'}}\n")
    assert expected in msg
    assert msg.startswith("dx.yaml:8:")


def test_bad_url_template_in_connector() -> None:
    assert "unbalanced" in error("    connector: {type: http, url: 'http://x/{id'}\n")


def test_backoff_is_exponential_capped_and_jittered() -> None:
    p = RetryPolicy(backoff_base_s=1, backoff_max_s=5, jitter=0.5)
    assert [p.delay(n, 0.0) for n in (1, 2, 3, 4)] == [1, 2, 4, 5]
    assert p.delay(2, 0.999) == pytest.approx(1.001)
    assert RetryPolicy(jitter=0).delay(1, 0.7) == 0.5


def test_routes_by_name_with_one_error_for_both_kinds() -> None:
    cfg = load("""    connector: {type: http, url: "http://erp.local/x"}
sources:
  - name: erp-orders
    topic: erp.orders
    table: public.orders
    key: [id]
    columns: [id]
""")
    assert cfg.sink("orders-to-erp") == (0, cfg.sinks[0])
    assert cfg.source("erp-orders") == (0, cfg.sources[0])
    with pytest.raises(ConfigError) as sink:
        cfg.sink("nope")
    assert str(sink.value) == ("dx.yaml:4: no sink route named 'nope' "
                               "(configured: orders-to-erp)")
    with pytest.raises(ConfigError) as source:
        cfg.source("orders-to-erp")
    assert str(source.value) == ("dx.yaml:9: no source route named 'orders-to-erp' "
                                 "(configured: erp-orders)")
