"""Compose the shipped Hydra config tree with command-line overrides."""

import difflib
import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from tunelab.errors import TunelabError, UsageError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
GROUPS = ("method", "modelpool", "data", "taskpool", "fabric")


def list_groups() -> dict[str, list[str]]:
    """Config group name -> the options shipped for it (``lm_finetune/fullfinetune_sft``...)."""
    groups = {}
    for group in GROUPS:
        root = CONFIG_DIR / group
        # files whose name starts with _ are parts other options include (method/lm_finetune/_engine)
        groups[group] = sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml") if not p.name.startswith("_"))
    return groups


def flatten(tree, prefix: str = "") -> dict:
    """A nested config (plain dicts) as dotted keys: ``{"method.optimizer.lr": 0.001, ...}``."""
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def compose_config(overrides: list[str]) -> DictConfig:
    """Compose ``configs/config.yaml`` with Hydra overrides (``key=value``, ``group=option``)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
            cfg = compose(config_name="config", overrides=list(overrides))
    except Exception as err:
        raise _explain(err, overrides) from None
    OmegaConf.set_struct(cfg, False)
    return cfg


def _explain(err: Exception, overrides: list[str]) -> UsageError:
    message = str(err)
    missing = re.search(r"Could not override '([^']+)'", message)
    if missing:
        key = missing.group(1)
        parent, _, leaf = key.rpartition(".")
        others = [o for o in overrides if not o.split("=", 1)[0].lstrip("+~") == key]
        valid: list[str] = []
        base = None
        try:
            base = compose_config(others)
            node = OmegaConf.select(base, parent) if parent else base
            if isinstance(node, DictConfig):
                valid = [str(k) for k in node.keys()]
        except TunelabError:
            pass
        if leaf in valid:  # the key exists: a {...} value brought keys the node lacks
            return UsageError(
                f"'{key}' cannot take new keys from a {{...}} value on the command line (it merges into the "
                f"shipped node). Replace the whole node instead: '~{key}' '+{key}={{...}}'."
            )
        if "_target_" in valid and _accepts_option(OmegaConf.select(base, f"{parent}._target_"), leaf):
            return UsageError(
                f"'{key}' is a valid option of {OmegaConf.select(base, f'{parent}._target_')} but is not in the "
                f"shipped config, so add it with a plus sign: '+{key}=VALUE'."
            )
        close = difflib.get_close_matches(leaf, valid, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(f'{parent}.{c}' if parent else c) for c in close)}?" if close else ""
        listing = f" Valid keys under '{parent or '<root>'}': {', '.join(sorted(valid))}." if valid else ""
        return UsageError(
            f"Unknown config key '{key}' on the command line.{hint}{listing} "
            "Fix the spelling; `tunelab train ... --cfg job` prints the whole config."
        )
    if "Could not find" in message or "Could not load" in message:
        groups = list_groups()
        return UsageError(
            f"{message.splitlines()[0]} Shipped options: "
            + "; ".join(f"{g}: {', '.join(opts)}" for g, opts in groups.items())
        )
    return UsageError(f"Invalid command-line override: {message.splitlines()[0]}")


def _accepts_option(target: str | None, name: str) -> bool:
    import inspect

    from hydra.utils import get_object

    try:
        return name in inspect.signature(get_object(target)).parameters
    except Exception:
        return False
