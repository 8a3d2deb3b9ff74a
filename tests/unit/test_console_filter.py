"""The task filter the console and ``dx tasks`` share: what the URL may say, and the SQL it
becomes (parameters in the order of their placeholders, user text only ever a parameter)."""

from __future__ import annotations

import pytest

from pipeline.console.accounts import Principal
from pipeline.tasks.store import FilterError, TaskFilter


def test_a_filter_round_trips_through_the_url() -> None:
    f = TaskFilter.from_params({"route": " pim ", "key": '{"id": 1}', "since": "2h",
                                   "text": "timeout"},
                                  lambda name: ["dead", "failed"] if name == "status" else [])
    assert f.status == ["dead", "failed"] and f.route == "pim"
    again = TaskFilter.from_params(dict(f.query()),
                                      lambda name: [v for k, v in f.query() if k == name])
    assert again == f


@pytest.mark.parametrize("params, message", [
    ({"status": "gone"}, "unknown status 'gone'"),
    ({"since": "yesterday-ish"}, "bad time 'yesterday-ish'"),
])
def test_a_bad_filter_is_one_clear_error(params: dict[str, str], message: str) -> None:
    with pytest.raises(FilterError, match=message):
        TaskFilter.from_params(params)


def test_parameters_follow_their_placeholders_and_like_wildcards_are_escaped() -> None:
    f = TaskFilter.from_params({"status": "dead", "route": "pim", "text": "50%_off"})
    where, params = f.where("status IN ('dead')", before=10)
    text = where.as_string(None)
    assert text.index("status =") < text.index("route =") < text.index("ILIKE") \
        < text.index("id <") < text.index("status IN")
    assert params == ["dead", "pim", "%50\\%\\_off%", 10]
    several = TaskFilter(status=["dead", "failed"]).where()
    assert "status = ANY" in several[0].as_string(None) and several[1] == [["dead", "failed"]]
    assert "50" not in text  # user text is a parameter, never SQL


def test_the_cli_and_the_console_read_one_filter() -> None:
    """``dx tasks list --text`` and the page's "error contains" are the same condition."""
    from pipeline.cli.sink_cmd import _filter

    cli = _filter(None, ["dead"], "pim", None, "2h", None, "timeout")
    page = TaskFilter.from_params({"status": "dead", "route": "pim", "since": "2h",
                                   "text": "timeout"})
    assert cli.where()[0].as_string(None) == page.where()[0].as_string(None)
    assert cli.query() == page.query()


def test_an_empty_filter_matches_everything() -> None:
    where, params = TaskFilter().where()
    assert where.as_string(None).strip() in ("", "WHERE TRUE") and params == []


def test_roles_are_ordered() -> None:
    viewer, operator, admin = (Principal("x", r, "session") for r in
                               ("viewer", "operator", "admin"))
    assert not viewer.may("operator") and operator.may("operator") and admin.may("operator")
    assert not operator.may("admin") and admin.may("admin")
    assert Principal("ci", "viewer", "token").actor == "token:ci"
