"""Sink routes: topics → filter → map → connector (filled in by the sink-worker work)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class SinkRoute(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
