"""Defects found in review of the inbound kinds, each pinned by a test that failed before its
fix: hostile signature headers are a 401 (not a 500 with a traceback), bodies nested too deeply
or with NaN are a 400, and JSON numbers keep every digit from the third party to the worker."""

from __future__ import annotations

import hashlib
import hmac
from decimal import Decimal

import pytest

from pipeline.api.errors import ApiError
from pipeline.config.auth import ReceivedHmac
from pipeline.config.inbound import WebhookConfig
from pipeline.inbound.entities import canonical, loads_exact
from pipeline.inbound.webhook import check_signature, stale_claim_s
from pipeline.source.decode import json_decode
from pipeline.source.validate import _json

AUTH = ReceivedHmac.model_validate({"kind": "hmac", "secret": "k"})


@pytest.mark.parametrize("header", [
    "t=1000,v1=é",  # compare_digest(str, str) raises TypeError on non-ASCII
    "t=1000,v1=\u0100",
    "t=²,v1=00",  # "²".isdigit() is True, int("²") a ValueError
    "t=\u0661\u0660\u0660\u0660,v1=00",  # Arabic-Indic digits
    "t=" + "9" * 5000 + ",v1=00",  # int() refuses more than 4300 digits
])
def test_a_hostile_signature_header_is_a_401(header: str) -> None:
    with pytest.raises(ApiError) as info:
        check(header)
    assert info.value.status == 401


def check(header: str) -> None:
    check_signature(AUTH, header, b"{}", now=1000)


def test_a_valid_signature_still_passes() -> None:
    mac = hmac.new(b"k", b"1000.{}", hashlib.sha256).hexdigest()
    check(f"t=1000,v1={mac}")


@pytest.mark.parametrize("body", [b"[" * 100_000 + b"]" * 100_000, b'{"price": NaN}',
                                  b'{"price": -Infinity}', b'\xff\xfe\x00'])
def test_unparseable_bodies_are_value_errors(body: bytes) -> None:
    with pytest.raises(ValueError):
        loads_exact(body)


def test_json_numbers_keep_every_digit_to_the_worker() -> None:
    value = loads_exact(b'{"price": 12345678901234567.89, "w": 1.10, "n": 7, "e": 1e2}')
    assert value == {"price": Decimal("12345678901234567.89"), "w": Decimal("1.10"), "n": 7,
                     "e": Decimal("1E+2")}
    text = canonical(value)
    assert text == '{"e":1E+2,"n":7,"price":12345678901234567.89,"w":1.10}'
    decoded = json_decode(text.encode())  # what the route's worker reads
    assert decoded["price"] == Decimal("12345678901234567.89")
    assert _json(None)({"a": decoded["w"]}) == '{"a":1.10}'  # a jsonb column: still a number


def test_a_claim_is_not_taken_over_while_its_request_may_still_wait_for_kafka() -> None:
    longest = WebhookConfig.model_fields["ack_timeout_s"].metadata  # le=300
    limit = next(m.le for m in longest if hasattr(m, "le"))
    assert stale_claim_s(float(limit)) > limit + 5  # the request's own wait
