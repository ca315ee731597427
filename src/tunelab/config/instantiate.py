"""Build objects from ``_target_`` nodes; runtime objects are passed at the call site."""

from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate as _hydra_instantiate
from omegaconf import DictConfig, OmegaConf

from tunelab.errors import TunelabError


def replace_placeholder(node: Any, placeholder: str, value: Any) -> Any:
    """Return a copy of a config node with every string equal to ``placeholder`` replaced."""
    if isinstance(node, DictConfig) or isinstance(node, dict):
        container = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node
        return {k: replace_placeholder(v, placeholder, value) for k, v in container.items()}
    if isinstance(node, (list, tuple)):
        return [replace_placeholder(v, placeholder, value) for v in node]
    return value if node == placeholder else node


def instantiate(node: Any, *args: Any, **kwargs: Any) -> Any:
    """Instantiate ``node`` with ``args``/``kwargs`` added; nested ``_target_`` nodes are left
    as plain dicts for the built object to instantiate itself (late binding)."""
    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=True)
    try:
        return _hydra_instantiate(node, *args, _recursive_=False, _convert_="all", **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, TunelabError):
            raise cause from None
        reason = (f"{type(cause).__name__}: {cause}" if cause is not None else str(err)).rstrip(".")
        raise TunelabError(
            f"Could not build {node.get('_target_')} from the config: {reason}. Check that node's options "
            "(`tunelab train ... --cfg job` prints them)."
        ) from err
