"""Check a composed config before any compute is spent.

Plain nodes are checked against the dataclasses in ``schema.py``; every node with a
``_target_`` is checked against the signature of the callable it names, so a misspelt key
anywhere (``method.optimizer.lrr``) is an error that names the key and the closest valid ones.
"""

import dataclasses
import difflib
import inspect
import re
import typing
from typing import Any, Literal, Union

from omegaconf import DictConfig, OmegaConf

from tunelab.config.schema import RunConfig
from tunelab.errors import TunelabError

_PLACEHOLDER = re.compile(r"^_[A-Za-z][A-Za-z0-9_]*_$")


def validate_config(cfg: DictConfig) -> None:
    """Raise TunelabError on an unknown key, a wrong type or a target that cannot be imported."""
    try:
        tree = OmegaConf.to_container(cfg, resolve=True)
    except Exception as err:  # interpolation errors name the key themselves
        raise TunelabError(f"The config could not be resolved: {err}") from None
    _check_dataclass(tree, RunConfig, "")


def locate(path: str, where: str) -> Any:
    from hydra.utils import get_object

    try:
        return get_object(path)
    except Exception:
        raise TunelabError(
            f"Config key '{where}' names '{path}', which cannot be imported. "
            "Check the spelling of the module and class, and that its package is installed."
        ) from None


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _unknown_key(path: str, key: str, valid: list[str], owner: str) -> TunelabError:
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(_join(path, c)) for c in close)}?" if close else ""
    return TunelabError(
        f"Unknown config key '{_join(path, key)}' ({owner} has no option '{key}').{hint} "
        f"Valid keys here: {', '.join(sorted(valid))}. Fix the spelling, or see "
        "`tunelab train --help` for the config groups."
    )


def _check_dataclass(node: Any, cls: type, path: str) -> None:
    if not isinstance(node, dict):
        raise TunelabError(f"Config key '{path}' must be a mapping of options, got {node!r}.")
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
        raise TunelabError(
            f"Config key '{path}' is {value!r}, but it must be {expected}. "
            f"Set it on the command line as {path}=VALUE."
        )
