"""The pgoutput decoder: messages as PostgreSQL sends them (protocol 1, text values)."""

from __future__ import annotations

import struct

from pipeline.relay import pgoutput


def _tuple(*values: bytes | None) -> bytes:
    out = struct.pack(">H", len(values))
    for v in values:
        out += b"n" if v is None else b"t" + struct.pack(">I", len(v)) + v
    return out


def test_relation_and_changes() -> None:
    rel = pgoutput.relation(b"R" + struct.pack(">I", 16384) + b"public\0items\0f" +
                            struct.pack(">H", 2) + b"\x01id\0" + struct.pack(">Ii", 23, -1) +
                            b"\x00note\0" + struct.pack(">Ii", 1043, 24))
    assert (rel.relid, rel.schema, rel.name, rel.replident) == (16384, "public", "items", "f")
    assert [(c.name, c.type_oid, c.typmod) for c in rel.columns] == [("id", 23, -1),
                                                                      ("note", 1043, 24)]
    assert pgoutput.change(b"I" + struct.pack(">I", 7) + b"N" + _tuple(b"1", None)) == (
        7, None, [b"1", None])
    upd = b"U" + struct.pack(">I", 7) + b"O" + _tuple(b"1", b"a") + b"N" + \
        struct.pack(">H", 2) + b"t" + struct.pack(">I", 1) + b"2" + b"u"
    assert pgoutput.change(upd) == (7, [b"1", b"a"], [b"2", pgoutput.UNCHANGED])
    assert pgoutput.change(b"D" + struct.pack(">I", 7) + b"O" + _tuple(b"1", b"a")) == (
        7, [b"1", b"a"], None)


def test_begin_commit_message() -> None:
    assert pgoutput.begin(b"B" + struct.pack(">QqI", 2 ** 33 + 5, 10, 42)) == (2 ** 33 + 5,
                                                                                10, 42)
    assert pgoutput.commit(b"C\0" + struct.pack(">QQq", 100, 120, 10)) == (100, 120)
    msg = b"M\x01" + struct.pack(">Q", 9) + b"dx.origin\0" + struct.pack(">I", 3) + b"erp"
    assert pgoutput.message(msg) == (True, "dx.origin", b"erp")
    assert pgoutput.lsn_text(2 ** 32 + 255) == "1/FF"
    assert pgoutput.truncate(b"T" + struct.pack(">IbII", 2, 0, 7, 8)) == [7, 8]


def test_text_values_take_the_form_jsonb_gives_them() -> None:
    p = pgoutput.text_parser
    assert p("int8", False)(b"-5") == -5 and p("bool", False)(b"t") is True
    assert p("numeric", False)(b"1.50") == "1.50"
    assert p("jsonb", False)(b'{"a": 1.5}') == {"a": __import__("decimal").Decimal("1.5")}
    assert p("text", True)(b'{a,NULL,"b,c","d\\"e","NULL"}') == ["a", None, "b,c", 'd"e',
                                                                  "NULL"]
    assert p("int4", True)(b"[0:1]={1,2}") == [1, 2]
    assert p("int4", True)(b"{{1,2},{3,NULL}}") == [[1, 2], [3, None]]
    assert p("text", True)(b"{}") == []


def test_an_update_is_told_unchanged_from_the_text_of_exposed_columns_only() -> None:
    from pipeline.relay.stream import Table

    t = Table("public.t", 1, ((0, "id", int), (2, "name", bytes.decode)), ("id",))
    old = [b"1", b"hidden", b"a"]
    assert t.unchanged(old, [b"1", b"other hidden", b"a"])
    assert t.unchanged(old, [b"1", b"hidden", pgoutput.UNCHANGED])  # TOASTed, not sent
    assert not t.unchanged(old, [b"1", b"hidden", b"b"])
    assert not t.unchanged(old, [b"1", b"hidden", None])
    assert t.unchanged(old, [b"1", b"hidden", b"b"], key_only=True)
    assert not t.unchanged(old, [b"2", b"hidden", b"a"], key_only=True)
    assert t.key_of(t.row([b"2", b"x", b"b"], old)) == {"id": 2}
