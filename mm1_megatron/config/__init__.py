"""Typed, validated configuration for mm1_megatron runs."""

from mm1_megatron.config.loader import (
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_config,
    save_config,
)
from mm1_megatron.config.schema import (
    CheckpointConfig,
    ConnectorConfig,
    DataConfig,
    LanguageModelConfig,
    LoggingConfig,
    MM1Config,
    ModelConfig,
    MoEConfig,
    OptimizerConfig,
    ParallelConfig,
    TrainingConfig,
    VisionEncoderConfig,
)
from mm1_megatron.config.validation import validate_config, validate_environment

__all__ = [
    "CheckpointConfig",
    "ConnectorConfig",
    "DataConfig",
    "LanguageModelConfig",
    "LoggingConfig",
    "MM1Config",
    "ModelConfig",
    "MoEConfig",
    "OptimizerConfig",
    "ParallelConfig",
    "TrainingConfig",
    "VisionEncoderConfig",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "save_config",
    "validate_config",
    "validate_environment",
]
