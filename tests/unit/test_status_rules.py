"""When ``dx status`` calls a route unhealthy, and how a consumer's readiness follows its
assignment (no services needed)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from pipeline.observability.server import WorkerServer
from pipeline.status import RelayStatus, RouteStatus, Status, Thresholds, route_problems


def route(lag: int | None, members: int | None, dead: int = 0) -> RouteStatus:
    return RouteStatus("pim", "sink", "dx-sink-pim", ["dx.public.products"], lag=lag,
                       members=members, tasks={"dead": dead} if dead else {})


def test_route_problems() -> None:
    limits = Thresholds(max_lag=100, max_dead=0)
    assert route_problems(route(0, 0), limits) == []               # idle and caught up
    assert route_problems(route(50, 2), limits) == []              # working through a backlog
    assert route_problems(route(None, None), limits) == []         # unknown is not a verdict
    assert route_problems(route(101, 2), limits) == [
        "route pim (sink): 101 messages behind (threshold 100)"]
    assert route_problems(route(3, 0), limits) == [
        "route pim (sink): 3 messages behind and no worker is running ('dx sink run pim')"]
    assert route_problems(route(0, 1, dead=2), limits) == [
        "route pim (sink): 2 dead task(s); see 'dx tasks list --route pim --status dead'"]
    assert route_problems(route(0, 1, dead=2), Thresholds(max_dead=2)) == []


def test_status_json_is_healthy_only_without_problems() -> None:
    ok = Status(RelayStatus(), [route(0, 1)])
    assert ok.to_json()["healthy"] is True
    assert ok.to_json()["routes"][0]["dead"] == 0
    bad = Status(RelayStatus(), [], problems=["x"])
    assert bad.to_json() | {"relay": None} == {
        "healthy": False, "problems": ["x"], "relay": None,
        "kafka": {"reachable": True, "error": None}, "routes": []}


def test_readiness_follows_the_assignment() -> None:
    server = WorkerServer(0, registry=CollectorRegistry())
    assert server.readiness() == (False, {"status": "not ready", "reason": "starting"})
    server.set_assignment(0)
    assert server.readiness()[0] is False and server.readiness(standby_ok=True)[0] is True
    server.set_assignment(3)
    assert server.readiness() == (True, {"status": "ready", "reason": "3 partition(s) assigned"})
    server.set_assignment(3, stopping=True)
    assert server.readiness(standby_ok=True) == (False, {"status": "not ready",
                                                         "reason": "stopping"})
