"""The one dead-letter header vocabulary, for sink and source routes alike.

A dead letter is the original message (key, value, headers) plus:

====================  ============================================================
``dx.dlq.route``      the route that gave up on it
``dx.dlq.error``      why (at most 4,000 bytes)
``dx.dlq.error.class``  ``terminal:<Type>`` or ``transient:<Type>`` (retries exhausted)
``dx.dlq.error.field``  the field at fault, when one is (inbound validation)
``dx.dlq.topic``      where the message was consumed: topic,
``dx.dlq.partition``  partition,
``dx.dlq.offset``     and offset
``dx.dlq.attempts``   delivery attempts made (sink routes)
``dx.dlq.ts_ms``      when it was dead-lettered (epoch milliseconds)
``dx.dlq.truncated``  ``true`` when the message was too large and its value was replaced by a
                      marker (the task store keeps the original); ``dx.dlq.original_bytes``
====================  ============================================================
"""

from __future__ import annotations

import time

Headers = list[tuple[str, bytes]]


def dead_letter_headers(*, route: str, topic: str, partition: int, offset: int, error: str,
                        error_class: str, attempts: int | None = None,
                        field: str | None = None) -> Headers:
    out: Headers = [("dx.dlq.route", route.encode()),
                    ("dx.dlq.error", error.encode()[:4000]),
                    ("dx.dlq.error.class", error_class.encode())]
    if field:
        out.append(("dx.dlq.error.field", field.encode()))
    out += [("dx.dlq.topic", topic.encode()),
            ("dx.dlq.partition", str(partition).encode()),
            ("dx.dlq.offset", str(offset).encode())]
    if attempts is not None:
        out.append(("dx.dlq.attempts", str(attempts).encode()))
    out.append(("dx.dlq.ts_ms", str(int(time.time() * 1000)).encode()))
    return out


def truncated_headers(original_bytes: int) -> Headers:
    return [("dx.dlq.truncated", b"true"), ("dx.dlq.original_bytes", str(original_bytes).encode())]
