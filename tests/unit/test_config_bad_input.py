"""Bad configuration files give one line naming file and line, exit code 1, never a traceback:
YAML tags, recursive aliases, alias bombs, non-UTF-8 bytes, control characters, bad timestamps,
oversized numbers, deep nesting, and librdkafka properties librdkafka refuses."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from pipeline.cli.main import main

BASE = b"""\
database:
  url: postgresql://dx@127.0.0.1:1/dx
kafka:
  bootstrap_servers: 127.0.0.1:1
schema_registry:
  url: http://127.0.0.1:1
"""
CLIENT = BASE.replace(b"  bootstrap_servers: 127.0.0.1:1\n",
                      b"  bootstrap_servers: 127.0.0.1:1\n  client:\n    acks: all\n")
BOMB = b"".join(b"l%d: &l%d [%s]\n" % (i + 1, i + 1, b", ".join([b"*l%d" % i] * 9))
                for i in range(9))

CASES = {
    "python tag on a scalar": (BASE + b"relay:\n  name: !!python/object/apply:os.system [id]\n",
                               8, "YAML tag !!python/object/apply:os.system is not allowed"),
    "python tag on a mapping": (BASE + b"relay: !!python/object:os.system\n  name: x\n",
                                7, "YAML tag !!python/object:os.system is not allowed"),
    "custom tag": (BASE + b"relay:\n  name: !secret x\n", 8, "YAML tag !secret is not allowed"),
    "recursive alias": (BASE + b"tables: &t\n  - *t\n", 7, "an alias refers to a value that "
                                                          "contains it (recursive)"),
    "alias bomb": (BASE + b"l0: &l0 [x]\n" + BOMB, 7, "values after expanding aliases"),
    "latin-1 byte": (BASE + b"relay:\n  name: caf\xe9\n", 8, "not UTF-8 text: byte 0xe9"),
    "utf-16 file": ("\n".join(BASE.decode().splitlines()).encode("utf-16"), 1,
                    "not UTF-8 text: byte 0xff"),
    "control character": (BASE + b'relay:\n  name: "a\x07b"\n', 8, "character #x0007 is not "
                                                                   "allowed"),
    "NUL byte": (BASE + b"relay:\n  name: a\x00b\n", 8, "character #x0000 is not allowed"),
    "month 13": (BASE + b"relay:\n  name: 2024-13-45\n", 8,
                 "'2024-13-45' is not a valid timestamp (month must be in 1..12)"),
    "30 February": (BASE + b"relay:\n  name: 2024-02-30T10:00:00\n", 8,
                    "'2024-02-30T10:00:00' is not a valid timestamp (day is out of range"),
    "5000-digit number": (BASE + b"relay:\n  batch_size: 1" + b"0" * 5000 + b"\n", 8,
                          "is not a valid int"),
    "deep nesting": (BASE + b"relay: " + b"[" * 100 + b"]" * 100 + b"\n", 7,
                     "nested more than 64 levels deep"),
    "kafka.client typo": (CLIENT.replace(b"acks: all", b"linger.mss: 5"), 6,
                          'kafka.client.linger.mss: librdkafka refuses it: No such '
                          'configuration property: "linger.mss"'),
    "kafka.client bad value": (CLIENT.replace(b"acks: all", b"acks: sometimes"), 6,
                               "kafka.client.acks: librdkafka refuses it: Invalid value"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_config_is_one_line_with_file_and_line(case: str, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    content, line, fragment = CASES[case]
    path = tmp_path / "dx.yaml"
    path.write_bytes(content)
    monkeypatch.setattr(sys, "argv", ["dx", "validate", "-c", str(path)])
    with pytest.raises(SystemExit) as exited:
        main()  # anything but a DxError would escape here as an exception: a traceback
    assert exited.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"dx: error: {path}:{line}: "), err
    assert fragment in err, err


def test_kafka_client_properties_that_need_the_machine_are_left_to_the_workers(
        tmp_path: Path) -> None:
    """Certificates may exist only where the workers run; dx validate does not require them."""
    from pipeline.config.loader import load_config

    path = tmp_path / "dx.yaml"
    path.write_bytes(CLIENT.replace(b"acks: all", b"security.protocol: SSL\n"
                                                  b"    ssl.ca.location: /nowhere/ca.pem\n"
                                                  b"    ssl.keystore.location: /nowhere/k.p12\n"
                                                  b"    ssl.keystore.password: x"))
    assert load_config(path).kafka.client["ssl.ca.location"] == "/nowhere/ca.pem"
