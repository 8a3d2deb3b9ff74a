"""Task rows as the sink worker writes them: nothing PostgreSQL text/jsonb refuses (NUL,
unpaired surrogates) reaches the database; raw headers survive a round trip exactly."""

from __future__ import annotations

from pipeline.tasks.headers import decode_header, encode_header
from pipeline.tasks.store import TaskRow


def test_params_remove_nul_from_text_and_json_fields() -> None:
    row = TaskRow(route="r", topic="t", partition=0, offset=1, status="dead", key="k\x00",
                  error="HTTP 400: bad\x00sku", import_log={"a\x00": ["x\x00", 1, None]},
                  export_log={"response": "r\x00"}, raw_headers=[["h\x00", "v\x00"]],
                  dlq={"error": "\ud800\x00"}, raw_value=b"\x00kept")
    p = row.params()
    assert "\x00" not in repr([p[4], p[9]]) and p[9] == "HTTP 400: badsku"
    assert p[10].obj == {"a": ["x", 1, None]}
    assert p[11].obj == {"response": "r"}
    assert p[13] == b"\x00kept"  # bytea holds anything
    assert p[14].obj == [["h", "v"]]
    assert p[15].obj == {"error": "?"}


def test_headers_round_trip_through_the_task_store_form() -> None:
    for value in (b"plain", b"", b"a\x00b", b"\xff\xfe", "ünïcode".encode(), None):
        row = encode_header("h", value)
        assert "\x00" not in "".join(str(x) for x in row)
        assert decode_header(row) == ("h", value)
    assert encode_header("h", b"text") == ["h", "text"]
    assert encode_header("h", None) == ["h", None]
    assert decode_header(["h", "old-form"]) == ("h", b"old-form")
