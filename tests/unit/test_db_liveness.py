"""Every connection dx opens carries TCP liveness settings on both ends, unless the URL or the
caller already chose them (then theirs win, and other ``options`` are kept)."""

from __future__ import annotations

from pipeline.db import KEEPALIVES, SERVER_KEEPALIVES, liveness_params


def test_defaults_fill_in_both_ends() -> None:
    params = liveness_params("postgresql://u@h:5432/d", {})
    assert {k: params[k] for k in KEEPALIVES} == KEEPALIVES
    assert params["options"] == SERVER_KEEPALIVES


def test_url_and_caller_settings_win_and_options_are_kept() -> None:
    params = liveness_params(
        "postgresql://u@h/d?keepalives_idle=60&options=-c%20search_path%3Dshop",
        {"tcp_user_timeout": 5000})
    assert "keepalives_idle" not in params  # the URL's stays
    assert params["tcp_user_timeout"] == 5000
    assert params["options"] == f"{SERVER_KEEPALIVES} -c search_path=shop"
    own = liveness_params("postgresql://u@h/d?options=-c%20tcp_keepalives_idle%3D99", {})
    assert "options" not in own  # the URL set the server side itself
