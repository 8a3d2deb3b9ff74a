"""Sink connectors by name, as dx.yaml sees them: the settings base class and where each
connector's settings model lives.

Configuration sits below the connectors (they import config's auth models and templates), so it
never imports them: built-in connectors are listed as import paths, loaded on first use, so that
loading ``dx.yaml`` imports only their small settings modules, not their clients. Third-party
connectors register through the entry point group ``dx.connectors``
(``name = "package.module:ConnectorClass"``); the class carries its settings model as
``settings_model``. ``connectors.registry`` builds connectors from the same table.
"""

from __future__ import annotations

import importlib
from functools import cache
from importlib.metadata import entry_points
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

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


class ConnectorSettings(BaseModel):
    """Base of every connector's settings model: unknown keys are errors, values are frozen.

    Subclasses declare ``type: Literal["name"]`` and their fields with descriptions; secrets are
    ``SecretStr`` filled from ``${VAR}`` in dx.yaml.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: str = Field(description="connector name in the registry")


def load(path: str) -> Any:
    """The object at ``module:attr``; a missing optional dependency is one actionable line."""
    module, _, attr = path.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except ImportError as err:
        missing = err.name or module
        raise ConfigError(f"connector needs module {missing!r} which is not installed; "
                          f"run: pip install 'dx[{missing}]'") from None


@cache
def plugins() -> dict[str, str]:
    """Third-party connectors: name -> connector class path, from the entry points."""
    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}


def names() -> list[str]:
    return sorted({*BUILTIN, *plugins()})


def class_path(name: str) -> str:
    """Where connector ``name``'s class lives; KeyError with the known names otherwise."""
    if name in BUILTIN:
        return BUILTIN[name][1]
    if name in plugins():
        return plugins()[name]
    raise KeyError(f"unknown connector {name!r}; known: {', '.join(names())}")


def settings_model(name: str) -> type[ConnectorSettings]:
    """The settings model of connector ``name``; KeyError with the known names otherwise."""
    if name in BUILTIN:
        model: type[ConnectorSettings] = load(BUILTIN[name][0])
        return model
    plugin: type[ConnectorSettings] = load(class_path(name)).settings_model
    return plugin
