from istr_viz.errors import CheckpointError, ConfigError, DataError, IstrVizError

__version__ = "0.1.0"

__all__ = ["CheckpointError", "ConfigError", "DataError", "IstrVizError", "__version__"]
