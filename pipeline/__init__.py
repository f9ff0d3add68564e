"""Provision Huawei IoTDA gateway child devices into Envision EnOS DPS, through Kafka.

The public names are imported on first use (PEP 562), so that ``python -m pipeline``
can hold SIGTERM (:mod:`pipeline._signals`) before anything heavy is imported.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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

_FROM = {
    "Config": "pipeline.config",
    "Secret": "pipeline.config",
    "load_config": "pipeline.config",
    "ConfigError": "pipeline.errors",
    "DecodeError": "pipeline.errors",
    "DpsError": "pipeline.errors",
    "DpsRejected": "pipeline.errors",
    "DpsTransient": "pipeline.errors",
    "MappingError": "pipeline.errors",
    "PipelineError": "pipeline.errors",
    "StageFailed": "pipeline.errors",
}


def __getattr__(name: str) -> Any:
    if name == "__version__":
        from importlib.metadata import version  # noqa: PLC0415  (slow to import: on use)

        return version("iot-pipeline")
    module = _FROM.get(name)
    if module is None:
        msg = f"module 'pipeline' has no attribute {name!r}"
        raise AttributeError(msg)
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
