"""Source (inbound) routes: topic → validate → apply to a table (filled in by the source work)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class SourceRoute(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
