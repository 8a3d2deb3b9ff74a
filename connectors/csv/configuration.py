"""Settings of the ``csv`` connector."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from connectors.base import ConnectorSettings


class CsvSettings(ConnectorSettings):
    """Append records to CSV files in ``directory``; a file is finished (renamed from ``.part``
    to ``.csv``) when it reaches ``rotate_bytes`` or is ``rotate_seconds`` old, so readers only
    ever see complete files."""

    type: Literal["csv"]
    directory: str = Field(description="where files are written (created if missing)")
    prefix: str | None = Field(None, description="file name prefix; default the route name")
    columns: list[str] | None = Field(
        None, description="header; default the first record's fields (a record with other "
        "fields starts a new file)")
    include_metadata: bool = Field(True, description="add _event_id, _op, _ts_ms columns")
    rotate_bytes: int | None = Field(64 * 1024 * 1024, ge=1024, description="max file size")
    rotate_seconds: float | None = Field(3600, gt=0, description="max file age")
    delimiter: Literal[",", ";", "\t", "|"] = ","
    fsync: bool = Field(True, description="fsync before reporting a batch delivered")

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, v: str | None) -> str | None:
        if v is not None and ("/" in v or v.startswith(".")):
            raise ValueError("a plain file name prefix, no '/' and not starting with '.'")
        return v
