"""Connectors by name: the class for a route's validated settings.

The table of names (built-in import paths and the ``dx.connectors`` entry points) lives with the
configuration that validates the settings, :mod:`pipeline.config.connectors`; this module turns a
name into a running connector.
"""

from __future__ import annotations

from typing import Any

from connectors.base import Connector, ConnectorSettings
from pipeline.config.connectors import class_path, load


def connector_class(name: str) -> type[Connector[Any]]:
    """The connector class of ``name``; KeyError with the known names otherwise."""
    cls: type[Connector[Any]] = load(class_path(name))
    return cls


def create(settings: ConnectorSettings, *, route: str) -> Connector[Any]:
    """Instantiate the connector for validated ``settings``."""
    return connector_class(settings.type)(settings, route=route)
