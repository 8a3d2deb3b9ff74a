"""One exception root for dx.

Every failure is either *transient* (worth retrying: a broker restart, a 503, a lost connection)
or *terminal* (retrying cannot help: bad configuration, a schema the registry rejects, a 400).
Workers decide retry versus dead-letter from this split alone, so driver errors are wrapped into
one of these where they enter dx code.
"""

from __future__ import annotations


class DxError(Exception):
    """Root of every error dx raises on purpose. The CLI prints ``str(err)`` as one line."""

    transient: bool = False


class TransientError(DxError):
    """Retrying later may succeed."""

    transient = True


class TerminalError(DxError):
    """Retrying the same input will fail the same way."""


class ConfigError(TerminalError):
    """Configuration is invalid; the message names file, line and key."""

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None) -> None:
        self.file = file
        self.line = line
        where = ""
        if file is not None:
            where = f"{file}:{line}: " if line is not None else f"{file}: "
        super().__init__(f"{where}{message}")


class CatalogError(TerminalError):
    """A configured table or column does not exist or cannot be exchanged as configured."""


class ServiceUnavailable(TransientError):
    """PostgreSQL, Kafka or the schema registry could not be reached."""

    def __init__(self, service: str, where: str, detail: str) -> None:
        self.service = service
        self.detail = detail
        super().__init__(f"{service} unreachable at {where}: {detail}")


class SchemaError(TerminalError):
    """A schema is incompatible with what the registry holds, or cannot be generated."""


class EventError(TerminalError):
    """An event cannot be decoded or processed; names topic, partition and offset."""

    def __init__(self, message: str, *, topic: str, partition: int, offset: int) -> None:
        self.topic = topic
        self.partition = partition
        self.offset = offset
        super().__init__(f"{topic}[{partition}]@{offset}: {message}")


class OutboxRowError(TerminalError):
    """A captured change cannot become an event (e.g. numeric NaN has no Avro decimal form).

    The relay stops on it rather than skip it: events after it would overtake it. The operator
    fixes the cause, or sets the row aside with ``dx outbox quarantine SEQ:ID`` (kept in
    ``dx.outbox_quarantine``, shown by ``dx status``)."""

    def __init__(self, message: str, *, entity: str, seq: int, id: int, key: object) -> None:
        self.entity, self.seq, self.id = entity, seq, id
        super().__init__(
            f"outbox row {seq}:{id} ({entity}, key {key}) cannot be encoded: {message}; fix the "
            f"value or set the row aside with 'dx outbox quarantine {seq}:{id}'")
