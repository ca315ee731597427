from tunelab.config.compose import CONFIG_DIR, compose_config, flatten, list_groups
from tunelab.config.instantiate import instantiate, replace_placeholder
from tunelab.config.schema import DataConfig, RunConfig
from tunelab.config.validate import validate_config

__all__ = [
    "CONFIG_DIR",
    "DataConfig",
    "RunConfig",
    "compose_config",
    "flatten",
    "instantiate",
    "list_groups",
    "replace_placeholder",
    "validate_config",
]
