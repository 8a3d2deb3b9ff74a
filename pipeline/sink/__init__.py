"""Sink workers: consume change events, filter, map, deliver through a connector, record tasks."""
