"""What every worker role shares to be operated: metrics, health endpoints, logs and traces.

* :mod:`pipeline.observability.metrics` — the Prometheus metrics (``dx_`` prefix, base units);
* :mod:`pipeline.observability.server` — ``/metrics``, ``/healthz``, ``/readyz`` per worker;
* :mod:`pipeline.observability.logging` — JSON logs for machines, text for terminals, redacted;
* :mod:`pipeline.observability.tracing` — OpenTelemetry context carried in Kafka headers.

Nothing here starts threads, opens sockets or touches the root logger at import time: a worker
opts in by calling :func:`~pipeline.observability.logging.setup_logging` and creating a
:class:`~pipeline.observability.server.WorkerServer`.
"""
