"""Load ``dx.yaml`` into :class:`DxConfig`, keeping file and line for every error.

PyYAML's composed node tree carries line marks; we build the plain data ourselves from it so each
key path remembers the line it came from, then map pydantic's error locations back to those lines.
``${VAR}`` and ``${VAR:-default}`` are interpolated from the environment in scalar values only,
so secrets live in the environment and never in the file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from pipeline.config.kafka_client import refused_property
from pipeline.config.model import DxConfig
from pipeline.errors import ConfigError
from pipeline.templates import MissingVariable, expand_env

Path_ = tuple[str | int, ...]

#: YAML's core tags: plain data. Anything else (``!!python/object``, ``!custom``) is refused,
#: also on mappings and sequences, where a safe loader would otherwise silently ignore it.
_PLAIN_TAGS = frozenset(f"tag:yaml.org,2002:{t}" for t in (
    "str", "int", "float", "bool", "null", "map", "seq", "timestamp"))
#: Aliases are expanded; a file that expands beyond this many values is refused (an alias
#: "bomb" would otherwise take all memory), as is nesting deeper than _MAX_DEPTH.
_MAX_NODES = 100_000
_MAX_DEPTH = 64


class _Builder:
    def __init__(self, file: str, env: dict[str, str]) -> None:
        self.file = file
        self.env = env
        self.lines: dict[Path_, int] = {}
        self._constructor = yaml.constructor.SafeConstructor()
        self._open: set[int] = set()  # ids of the nodes being built (an alias cycle check)
        self._nodes = 0

    def _error(self, node: yaml.Node, message: str) -> ConfigError:
        return ConfigError(message, file=self.file, line=node.start_mark.line + 1)

    def build(self, node: yaml.Node, path: Path_) -> Any:
        if id(node) in self._open:
            raise self._error(node, "an alias refers to a value that contains it (recursive)")
        self._nodes += 1
        if self._nodes > _MAX_NODES:
            raise self._error(node, f"more than {_MAX_NODES} values after expanding aliases")
        if len(path) > _MAX_DEPTH:
            raise self._error(node, f"nested more than {_MAX_DEPTH} levels deep")
        if node.tag not in _PLAIN_TAGS:
            raise self._error(node, f"YAML tag {node.tag.replace('tag:yaml.org,2002:', '!!')} "
                                    "is not allowed (dx.yaml holds plain data)")
        self._open.add(id(node))
        try:
            return self._build(node, path)
        finally:
            self._open.discard(id(node))

    def _build(self, node: yaml.Node, path: Path_) -> Any:
        line = node.start_mark.line + 1
        self.lines[path] = line
        if isinstance(node, yaml.MappingNode):
            out: dict[str, Any] = {}
            for key_node, value_node in node.value:
                if not isinstance(key_node, yaml.ScalarNode):
                    raise ConfigError("mapping keys must be plain strings", file=self.file,
                                      line=key_node.start_mark.line + 1)
                key = str(key_node.value)
                if key in out:
                    raise ConfigError(f"duplicate key {key!r}", file=self.file,
                                      line=key_node.start_mark.line + 1)
                self.lines[(*path, key)] = key_node.start_mark.line + 1
                out[key] = self.build(value_node, (*path, key))
                self.lines[(*path, key)] = key_node.start_mark.line + 1
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self.build(item, (*path, i)) for i, item in enumerate(node.value)]
        assert isinstance(node, yaml.ScalarNode)
        try:
            value = self._constructor.construct_object(node)
        except (ValueError, yaml.YAMLError) as err:  # 2024-13-45, a 5000-digit number
            kind = node.tag.rsplit(":", 1)[-1]
            raise self._error(node, f"{node.value[:40]!r} is not a valid {kind} ({err}); "
                                    "quote it to keep it as text") from None
        if isinstance(value, str):
            try:
                value = expand_env(value, self.env)
            except MissingVariable as err:
                raise ConfigError(str(err), file=self.file, line=line) from None
        return value

    def line_for(self, loc: Path_) -> int | None:
        for n in range(len(loc), -1, -1):
            if loc[:n] in self.lines:
                return self.lines[loc[:n]]
        return None


def _loc_text(loc: Path_) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"


def parse_config(text: str, *, file: str = "dx.yaml",
                 env: dict[str, str] | None = None) -> DxConfig:
    """Parse configuration text; raise :class:`ConfigError` naming file, line and key."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark
        raise ConfigError(f"not valid YAML: {err.problem}", file=file,
                          line=mark.line + 1 if mark else None) from None
    except yaml.reader.ReaderError as err:  # control characters, NUL
        raise ConfigError(f"not valid YAML: character #x{err.character:04x} is not allowed "
                          "(write control characters as escapes in double quotes)", file=file,
                          line=text[:err.position].count("\n") + 1) from None
    except RecursionError:
        raise ConfigError("not valid YAML: nested too deeply", file=file) from None
    if root is None:
        raise ConfigError("the file is empty", file=file, line=1)
    builder = _Builder(file, dict(os.environ) if env is None else env)
    data = builder.build(root, ())
    if not isinstance(data, dict):
        raise ConfigError("the top level must be a mapping", file=file, line=1)
    try:
        config = DxConfig.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        loc = tuple(p for p in first["loc"] if isinstance(p, str | int))
        msg = first["msg"]
        if first["type"] == "extra_forbidden":
            allowed = _allowed_keys(loc[:-1], data)
            msg = f"unknown key {loc[-1]!r}" + (f"; allowed: {', '.join(allowed)}" if allowed
                                                   else "")
        more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
        raise ConfigError(f"{_loc_text(loc)}: {msg}{more}", file=file,
                          line=builder.line_for(loc)) from None
    refused = refused_property(config.kafka.client)
    if refused is not None:
        key, reason = refused
        at: Path_ = ("kafka", "client", key) if key is not None else ("kafka", "client")
        raise ConfigError(f"{_loc_text(at)}: librdkafka refuses it: {reason}", file=file,
                          line=builder.line_for(at))
    config.attach_source(file, builder.lines)
    return config


def _allowed_keys(loc: Path_, data: Any) -> list[str]:
    """Field names of the model at ``loc``, to tell the user what they could have written."""
    from pipeline.config.model import model_at

    model = model_at(loc, data)
    return sorted(model.model_fields) if model is not None else []


def load_config(path: str | os.PathLike[str], env: dict[str, str] | None = None) -> DxConfig:
    """Read and validate a dx.yaml file."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as err:
        raise ConfigError(f"cannot read configuration: {err.strerror} (give another file with "
                          "-c FILE or DX_CONFIG)", file=str(p)) from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise ConfigError(f"not UTF-8 text: byte 0x{data[err.start]:02x} (save the file as "
                          "UTF-8)", file=str(p), line=line) from None
    return parse_config(text, file=str(p), env=env)
