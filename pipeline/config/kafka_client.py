"""Checking ``kafka.client`` (extra librdkafka properties) when the configuration is loaded.

librdkafka refuses an unknown property or a bad value only when a client is constructed, which
used to be the relay's first producer: ``dx validate`` passed and the relay crashed. Here a
throw-away producer is constructed from the properties alone (no ``bootstrap.servers``, so it
never connects; consumer-only properties are accepted by a producer with a warning), and the
first property it refuses is reported with its line.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from confluent_kafka import KafkaException, Producer

_QUIET = logging.getLogger("dx.librdkafka.config-check")
_QUIET.setLevel(logging.CRITICAL)
_QUIET.propagate = False


def _refusal(conf: Mapping[str, object]) -> str | None:
    try:
        client = Producer(dict(conf), logger=_QUIET)
    except KafkaException as err:
        kerr = err.args[0]
        return str(kerr.str() if hasattr(kerr, "str") else kerr)
    del client
    return None


def refused_property(client: Mapping[str, object]) -> tuple[str | None, str] | None:
    """``(key, librdkafka's reason)`` for properties librdkafka refuses, else None. ``key`` is
    the property at fault (found by trying each alone) when librdkafka refuses a name or a
    value, None when only the combination fails. A failure that depends on files of the
    machine (``ssl.*.location``, a keytab) is left to the workers: ``dx validate`` may run
    where those files are not."""
    if not client:
        return None
    reason = _refusal(client)
    if reason is None or any(word in reason for word in _MACHINE_DEPENDENT):
        return None
    if "configuration property" in reason:  # a name or a value: find which key
        for key, value in client.items():
            alone = _refusal({key: value})
            if alone is not None and "configuration property" in alone:
                return key, alone
    return None, reason


_MACHINE_DEPENDENT = ("location", "keytab", "No such file")
