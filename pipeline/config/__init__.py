"""dx.yaml: the typed configuration model, its loader (file and line in every error) and the
check against the live database catalog."""

from pipeline.config.loader import load_config
from pipeline.config.model import DxConfig, TableConfig

__all__ = ["DxConfig", "TableConfig", "load_config"]
