"""Fixtures of the integration tier only (the stack itself is in ``tests/conftest.py``)."""

from __future__ import annotations

import pytest

#: both capture modes, for capture/relay tests that must hold in each
CAPTURE_MODES = ("logical", "trigger")


@pytest.fixture(params=CAPTURE_MODES)
def capture_mode(request: pytest.FixtureRequest) -> str:
    """Runs a test once with logical and once with trigger capture (``capture.mode``)."""
    return str(request.param)
