"""Connectors by name.

Built-in connectors are listed here as import paths so that loading ``dx.yaml`` imports only their
small settings modules, not their clients. Third-party connectors register through the entry
point group ``dx.connectors`` (``name = "package.module:ConnectorClass"``); the class carries its
settings model as ``settings_model``.
"""

from __future__ import annotations

import importlib
from functools import cache
from importlib.metadata import entry_points
from typing import Any

from connectors.base import Connector, ConnectorSettings
from pipeline.errors import ConfigError

ENTRY_POINT_GROUP = "dx.connectors"

#: name -> (settings class path, connector class path)
BUILTIN: dict[str, tuple[str, str]] = {
    "http": ("connectors.http.configuration:HttpSettings",
             "connectors.http.connector:HttpConnector"),
    "postgres": ("connectors.postgres.configuration:PostgresSettings",
                 "connectors.postgres.connector:PostgresConnector"),
    "csv": ("connectors.csv.configuration:CsvSettings",
            "connectors.csv.connector:CsvConnector"),
    "sql": ("connectors.sql.configuration:SqlSettings",
            "connectors.sql.connector:SqlConnector"),
}


def _load(path: str) -> Any:
    module, _, attr = path.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except ImportError as err:
        missing = err.name or module
        raise ConfigError(f"connector needs module {missing!r} which is not installed; "
                          f"run: pip install 'dx[{missing}]'") from None


@cache
def _plugins() -> dict[str, str]:
    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}


def names() -> list[str]:
    return sorted({*BUILTIN, *_plugins()})


def settings_model(name: str) -> type[ConnectorSettings]:
    """The settings model of connector ``name``; KeyError with the known names otherwise."""
    if name in BUILTIN:
        model: type[ConnectorSettings] = _load(BUILTIN[name][0])
        return model
    if name in _plugins():
        cls: type[Connector[Any]] = _load(_plugins()[name])
        return cls.settings_model
    raise KeyError(f"unknown connector {name!r}; known: {', '.join(names())}")


def connector_class(name: str) -> type[Connector[Any]]:
    if name in BUILTIN:
        cls: type[Connector[Any]] = _load(BUILTIN[name][1])
        return cls
    if name in _plugins():
        plugin: type[Connector[Any]] = _load(_plugins()[name])
        return plugin
    raise KeyError(f"unknown connector {name!r}; known: {', '.join(names())}")


def create(settings: ConnectorSettings, *, route: str) -> Connector[Any]:
    """Instantiate the connector for validated ``settings``."""
    return connector_class(settings.type)(settings, route=route)
