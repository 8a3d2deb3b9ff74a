"""``capture.mode``: auto by default, logical or trigger on request, and the earlier spelling
(``mode: row|statement``) still meaning trigger capture of that kind."""

from __future__ import annotations

import pytest

from pipeline.config.loader import parse_config
from pipeline.errors import ConfigError
from tests.unit.test_config_loader import BASE, ENV


@pytest.mark.parametrize(("section", "mode", "kind"), [
    ("", "auto", "row"),
    ("capture:\n  mode: logical\n", "logical", "row"),
    ("capture:\n  mode: trigger\n  trigger: statement\n", "trigger", "statement"),
    ("capture:\n  mode: statement\n", "trigger", "statement"),  # the earlier spelling
    ("capture:\n  mode: row\n", "trigger", "row"),
])
def test_capture_mode(section: str, mode: str, kind: str) -> None:
    cfg = parse_config(BASE + section, env=ENV)
    assert (cfg.capture.mode, cfg.capture.trigger) == (mode, kind)


@pytest.mark.parametrize(("section", "fragment"), [
    ("capture:\n  mode: wal\n", "capture.mode"),
    ("capture:\n  mode: row\n  trigger: statement\n", "old spelling of capture.trigger"),
])
def test_bad_capture_mode_names_the_line(section: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(BASE + section, file="dx.yaml", env=ENV)
    assert str(err.value).startswith("dx.yaml:1") and fragment in str(err.value)
