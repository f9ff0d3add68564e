"""Provision Huawei IoTDA gateway child devices into Envision EnOS DPS, through Kafka."""

import importlib.metadata

from pipeline.config import Config, Secret, load_config
from pipeline.errors import (
    ConfigError,
    DecodeError,
    DpsError,
    DpsRejected,
    DpsTransient,
    MappingError,
    PipelineError,
    StageFailed,
)

__version__ = importlib.metadata.version("iot-pipeline")

__all__ = [
    "Config",
    "ConfigError",
    "DecodeError",
    "DpsError",
    "DpsRejected",
    "DpsTransient",
    "MappingError",
    "PipelineError",
    "Secret",
    "StageFailed",
    "__version__",
    "load_config",
]
