"""``deploy/local/stack`` loaded as a module, for tests of its functions."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

STACK = Path(__file__).resolve().parents[1] / "deploy" / "local" / "stack"


def load_stack(name: str = "dx_local_stack_under_test") -> ModuleType:
    """The stack script as a module (its state directory and ports are read from the
    environment when it is loaded)."""
    loader = importlib.machinery.SourceFileLoader(name, str(STACK))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[loader.name] = module  # dataclasses look their module up while defined
    try:
        loader.exec_module(module)
    finally:
        del sys.modules[loader.name]
    return module
