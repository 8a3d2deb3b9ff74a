"""One Kafka message -> one validated :class:`Event`, or one :class:`Failure` saying why not.

This is the only place a message's content is judged; it never raises for a bad message (a bad
message fails alone), only for a service that is down (:class:`ServiceUnavailable`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pipeline.config.sources import SourceRoute
from pipeline.source.catalog import Target
from pipeline.source.decode import Decoded, header_event_id, json_decode, shape
from pipeline.source.events import Event, Failure, RawMessage
from pipeline.source.validate import FieldError, RowValidator

Decoder = Callable[[bytes], Any]


class Converter:
    """Decodes and validates messages of one route."""

    def __init__(self, route: SourceRoute, target: Target, decoder: Decoder | None = None):
        self.route = route
        self.target = target
        self.validator = RowValidator(route, target)
        self.decode_value: Decoder = decoder or json_decode
        self.decode_key: Decoder = self._key_decoder(decoder)

    @staticmethod
    def _key_decoder(decoder: Decoder | None) -> Decoder:
        """Keys come framed (Avro), as JSON, or as a plain string (a single key column)."""

        def decode(data: bytes) -> Any:
            if decoder is not None and data[:1] == b"\x00":
                return decoder(data)
            try:
                return json_decode(data)
            except FieldError:
                try:
                    return data.decode("utf-8")
                except UnicodeDecodeError:
                    raise FieldError(None, "undecodable key") from None

        return decode

    def __call__(self, m: RawMessage) -> Event | Failure:
        event_id = header_event_id(list(m.headers))
        try:
            value = None if m.value is None else self.decode_value(m.value)
            key = None if m.key is None else self.decode_key(m.key)
            d = shape(value, key, event_id)
            return self._event(m, d)
        except FieldError as err:
            return Failure(m, "dead", err.reason, err.field, None, event_id)

    def _key_from(self, fields: dict[str, Any] | None) -> tuple[Any, ...] | None:
        if fields is None:
            return None
        if set(fields) == {""}:
            if len(self.target.key) != 1:
                raise FieldError(None, f"the message key is a single value but the key of "
                                       f"{self.target.qualified} has {len(self.target.key)} "
                                       "columns")
            fields = {self.validator.field(self.target.key[0]): fields[""]}
        return self.validator.key(fields)

    def _event(self, m: RawMessage, d: Decoded) -> Event | Failure:
        mode = self.route.mode
        op = "delete" if mode == "delete" else d.op
        if op == "delete":
            if mode in ("upsert", "insert"):
                return Failure(m, "skipped", f"deletes are not applied by a route in mode "
                               f"{mode!r} (use 'upsert+delete')", None, None, d.event_id)
            key = None
            if d.record is not None and all(self.validator.field(k) in d.record
                                            for k in self.target.key):
                key = self.validator.key(d.record)
            if key is None:
                key = self._key_from(d.key)
            if key is None:
                raise FieldError(None, "a delete needs the key (in the message key or "
                                       "the 'before' image)")
            return Event(m, "delete", key, None, d.event_id)
        assert d.record is not None
        row = self.validator.row(d.record)
        key = self.validator.key_of_row(row)
        if d.key is not None:
            names = {self.validator.field(k) for k in self.target.key}
            if set(d.key) == {""} or names <= set(d.key):
                from_key = self._key_from(d.key)
                if from_key != key:
                    raise FieldError(self.validator.field(self.target.key[0]),
                                     f"the row's key {list(key)} differs from the message "
                                     f"key {list(from_key or ())}")
        return Event(m, "upsert", key, row, d.event_id)
