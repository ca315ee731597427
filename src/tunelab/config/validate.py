"""Check a composed config before any compute is spent.

Plain nodes are checked against the dataclasses in ``schema.py``; every node with a
``_target_`` is checked against the signature of the callable it names, so a misspelt key
anywhere (``method.optimizer.lrr``) is an error that names the key and the closest valid ones.
"""

import dataclasses
import difflib
import inspect
import math
import re
import typing
from typing import Any, Literal, Union

from omegaconf import DictConfig, OmegaConf

from tunelab.config.schema import RunConfig
from tunelab.errors import UsageError

_PLACEHOLDER = re.compile(r"^_[A-Za-z][A-Za-z0-9_]*_$")


def validate_config(cfg: DictConfig) -> None:
    """Raise UsageError on an unknown key, a wrong type or a target that cannot be imported."""
    try:
        tree = OmegaConf.to_container(cfg, resolve=True)
    except Exception as err:  # interpolation errors name the key themselves
        raise UsageError(f"The config could not be resolved: {err}") from None
    _check_dataclass(tree, RunConfig, "")
    check_ranges(tree, OmegaConf.to_container(cfg, resolve=False))


# Options with a meaningful range, by key name (in any section: method, its optimizer and scheduler,
# the adapter, the task pool, data, fabric). (test, what the value must be). A count of -1 means
# "no limit" where the option says so; null means "off" and is never checked.
def _positive(v):
    return v > 0


def _non_negative(v):
    return v >= 0


def _positive_or_unlimited(v):
    return v > 0 or v == -1


RANGES: dict[str, tuple] = {
    **dict.fromkeys(
        ("accumulate_grad_batches", "batch_size", "block_size", "checkpoint_save_frequency", "num_nodes", "loss_chunk_size", "lr",
         "max_lr", "max_completion_length", "max_length", "max_new_tokens", "max_prompt_length", "num_generations", "num_iterations",
         "num_mini_batches", "ppo_epochs", "r", "reward_model_batch_size", "lr_scheduler_frequency", "log_every_n_steps", "kl_horizon",
         "temperature", "gradient_clip_val", "cliprange", "cliprange_value", "epsilon", "epsilon_high", "lora_alpha", "limit",
         "num_proc", "max_samples", "max_val_samples", "kl_target", "value_lr", "eps", "num_virtual_tokens", "reduction_factor",
         "bottleneck_size", "per_device_batch_size", "keep_last_checkpoints"),
        (_positive, "positive"),
    ),  # fmt: skip
    **dict.fromkeys(("max_epochs", "max_steps", "max_steps_per_epoch"), (_positive_or_unlimited, "positive, or -1 for no limit")),
    **dict.fromkeys(
        ("beta", "eta_min", "every_n_steps", "init_lr", "kl_coef", "min_lr", "num_workers", "rpo_alpha", "simpo_gamma", "top_k",
         "vf_coef", "warmup_steps", "weight_decay", "log_samples_every_n_steps", "missing_eos_penalty", "ewc_lambda", "replay_ratio"),
        (_non_negative, "0 or more"),
    ),  # fmt: skip
    "val_fraction": (lambda v: 0 <= v < 1, "at least 0 and below 1 (a share of the records)"),
    "lora_dropout": (lambda v: 0 <= v < 1, "at least 0 and below 1"),
    "dropout": (lambda v: 0 <= v < 1, "at least 0 and below 1"),
    "top_p": (lambda v: 0 < v <= 1, "above 0 and at most 1"),
    "lam": (lambda v: 0 <= v <= 1, "between 0 and 1"),
    "gamma": (lambda v: 0 <= v <= 1, "between 0 and 1"),
    "label_smoothing": (lambda v: 0 <= v < 0.5, "at least 0 and below 0.5"),
}


def _devices(value) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return value > 0 or value == -1
    if isinstance(value, str):
        return value == "auto" or value == "-1" or re.fullmatch(r"\d+(,\d+)*,?", value.replace(" ", "")) is not None
    return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)


# Options whose values are not plain numbers: (test, what the value must be).
CHOICES: dict[str, tuple] = {
    "devices": (_devices, "a positive count, -1 (every device), 'auto', or device indices such as '0,1' or [0, 1]"),
    # the data loader's options live in a plain mapping (method.dataloader_kwargs): no signature types them
    **dict.fromkeys(("pin_memory", "persistent_workers", "drop_last", "use_dora", "use_rslora"), (lambda v: isinstance(v, bool), "true or false")),
}


def check_ranges(tree: Any, raw: Any, path: str = "") -> None:
    """Every number under a key of ``RANGES`` is inside its range. A value reached through an
    interpolation (``max_lr: ${method.optimizer.lr}``) is checked, and reported, at the key it
    comes from, so the message names the key the user set."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            source = raw.get(key) if isinstance(raw, dict) else None
            if isinstance(source, str) and "${" in source:
                continue
            where = _join(path, str(key))
            rule = RANGES.get(key)
            if rule and value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                if not (isinstance(value, str) and _PLACEHOLDER.match(value)):
                    raise UsageError(f"Config key '{where}' is {value!r}, but it must be a number ({rule[1]}). Set it on the command line as {where}=VALUE.")
            if rule and isinstance(value, (int, float)) and not isinstance(value, bool) and not (math.isfinite(value) and rule[0](value)):
                raise UsageError(f"Config key '{where}' is {value!r}, but it must be {rule[1]}. Set it on the command line as {where}=VALUE.")
            choice = CHOICES.get(key)
            if choice and value is not None and not choice[0](value):
                raise UsageError(f"Config key '{where}' is {value!r}, but it must be {choice[1]}. Set it on the command line as {where}=VALUE.")
            check_ranges(value, source, where)
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            check_ranges(value, raw[i] if isinstance(raw, list) and i < len(raw) else None, f"{path}[{i}]")


def locate(path: str, where: str) -> Any:
    from hydra.utils import get_object

    try:
        return get_object(path)
    except Exception:
        raise UsageError(
            f"Config key '{where}' names '{path}', which cannot be imported. "
            "Check the spelling of the module and class, and that its package is installed."
        ) from None


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _unknown_key(path: str, key: str, valid: list[str], owner: str) -> UsageError:
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(_join(path, c)) for c in close)}?" if close else ""
    return UsageError(
        f"Unknown config key '{_join(path, key)}' ({owner} has no option '{key}').{hint} "
        f"Valid keys here: {', '.join(sorted(valid))}. Fix the spelling, or see "
        "`tunelab train --help` for the config groups."
    )


def _check_dataclass(node: Any, cls: type, path: str) -> None:
    if not isinstance(node, dict):
        raise UsageError(f"Config key '{path}' must be a mapping of options, got {node!r}.")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key, value in node.items():
        if key not in names:
            raise _unknown_key(path, key, names, "this section")
        where = _join(path, key)
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            _check_dataclass(value, hint, where)
        elif isinstance(value, dict) and "_target_" in value:
            _check_target(value, where)
        else:
            _check_type(value, hint, where)


def _check_target(node: dict, path: str) -> None:
    target = locate(node["_target_"], _join(path, "_target_"))
    sig_owner = target.__init__ if inspect.isclass(target) else target
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return  # builtins without a signature: let instantiation report
    try:
        hints = typing.get_type_hints(sig_owner)
    except Exception:
        hints = {}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    valid = [n for n, p in params.items() if p.kind is not inspect.Parameter.VAR_POSITIONAL]
    for key, value in node.items():
        if key.startswith("_") and key.endswith("_"):
            continue  # _target_, _recursive_, _convert_, _partial_
        where = _join(path, key)
        if key not in params and not takes_any:
            raise _unknown_key(path, key, valid, node["_target_"])
        if isinstance(value, dict) and "_target_" in value:
            _check_target(value, where)
        elif where == "fabric.precision" and value == "auto":
            continue  # tunelab's own value, resolved by the engine before Fabric is built
        elif key in hints:
            _check_type(value, hints[key], where)


def _accepts(value: Any, hint: Any) -> bool | None:
    """True/False when the hint is simple enough to judge, None when it is not."""
    if hint is Any:
        return True
    origin = typing.get_origin(hint)
    if origin is Literal:
        return value in typing.get_args(hint)
    if origin is Union or str(origin) == "<class 'types.UnionType'>":
        verdicts = [_accepts(value, h) for h in typing.get_args(hint)]
        if any(v is True for v in verdicts):
            return True
        return None if any(v is None for v in verdicts) else False
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (dict, typing.Mapping) or hint is dict:
        return isinstance(value, dict)
    if origin in (list, tuple, typing.Sequence) or hint in (list, tuple):
        return isinstance(value, (list, tuple))
    return None


def _check_type(value: Any, hint: Any, path: str) -> None:
    if isinstance(value, str) and _PLACEHOLDER.match(value):
        return  # filled in at run time, e.g. _T_max_
    if _accepts(value, hint) is False:
        if typing.get_origin(hint) is Literal:
            expected = "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
        else:
            expected = getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
        raise UsageError(
            f"Config key '{path}' is {value!r}, but it must be {expected}. "
            f"Set it on the command line as {path}=VALUE."
        )
