"""Names in dx.yaml, checked and split one way: Kafka topic names and ``schema.table``
references (the schema is ``public`` when omitted)."""

from __future__ import annotations

import re
from typing import ClassVar

TOPIC = re.compile(r"^[A-Za-z0-9._-]{1,249}$")


def check_topic(v: str | None) -> str | None:
    """``v`` if it is a valid Kafka topic name (None passes: the default topic applies)."""
    if v is not None and not TOPIC.match(v):
        raise ValueError("not a valid Kafka topic name")
    return v


class TableRef:
    """``schema_name``, ``table_name`` and ``qualified`` of a model's ``schema.table`` field,
    named by the model in ``table_ref``."""

    table_ref: ClassVar[str]

    @property
    def _ref(self) -> str:
        ref: str = getattr(self, self.table_ref)
        return ref

    @property
    def schema_name(self) -> str:
        return self._ref.split(".", 1)[0] if "." in self._ref else "public"

    @property
    def table_name(self) -> str:
        return self._ref.split(".", 1)[1] if "." in self._ref else self._ref

    @property
    def qualified(self) -> str:
        return f"{self.schema_name}.{self.table_name}"
