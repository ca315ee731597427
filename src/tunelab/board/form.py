"""The board's launch form: its fields, the overrides a filled form means, and its validation by
the command line's own checks (``compose_config`` and ``tunelab.engine.check_run``), each error
put next to the field it is about.

A field is an override key (``method.optimizer.lr``) or a config group (``method``); an empty
field leaves the shipped config's value. ``extra`` takes any other overrides, one per line.
"""

import re
import threading
import typing
from dataclasses import asdict, dataclass

from tunelab.errors import TunelabError


@dataclass
class Field:
    key: str  # the override key, or a config group's name
    label: str
    kind: str  # group | text | number | choice | lines
    help: str = ""
    choices: tuple = ()


def fields() -> list[Field]:
    from tunelab.config import list_groups
    from tunelab.config.schema import DataFormat

    groups = list_groups()
    return [
        Field("name", "Run name", "text", "the run's folder under the board's runs folder"),
        Field("method", "Method", "group", "what is optimised", tuple(groups["method"])),
        Field("modelpool", "Model pool", "group", "which model to start from", tuple(groups["modelpool"])),
        Field("data", "Data", "group", "a shipped data config (gsm8k-demo: 200 GSM8K problems shipped with tunelab)", tuple(groups["data"])),
        Field("data.path", "Data file", "text", "JSON lines, JSON, Parquet or CSV; empty: the data config's file"),
        Field("data.format", "Data format", "choice", "empty: the data config's format", ("", *typing.get_args(DataFormat))),
        Field("taskpool", "Task pool", "group", "how the run is evaluated (heldout-loss: loss on data.val_fraction)", tuple(groups["taskpool"])),
        Field("method.optimizer.lr", "Learning rate", "number", "empty: the method's default"),
        Field("method.max_steps", "Max steps", "number", "-1: no limit from this side"),
        Field("method.max_epochs", "Max epochs", "number"),
        Field("method.dataloader_kwargs.batch_size", "Batch size", "number", "per device"),
        Field("method.save_ckpt_type", "Checkpoint format", "choice",
              "empty: hf for a full model, peft for an adapter (what chat and export load)", ("", "hf", "peft", "lightning")),
        Field("extra", "More overrides", "lines", "KEY=VALUE, one per line, as on the command line"),
    ]  # fmt: skip


def field_dicts() -> list[dict]:
    return [asdict(f) for f in fields()]


GROUPS = ("method", "modelpool", "data", "taskpool")
DEFAULT_FORM = {"method": "lm_finetune/fullfinetune_sft", "modelpool": "CausalLMPool/smollm2-135m", "data": "gsm8k-demo", "taskpool": "heldout-loss"}

# Hydra's compose keeps global state: one form is composed at a time.
_COMPOSE = threading.Lock()


def form_overrides(form: dict) -> list[str]:
    """The overrides a filled form means, in the order a user would type them."""
    overrides = [f"{group}={form[group]}" for group in GROUPS if str(form.get(group) or "").strip()]
    for f in fields():
        if f.kind in ("text", "number", "choice") and f.key != "name":
            value = str(form.get(f.key) or "").strip()
            if value:
                overrides.append(f"{f.key}={value}")
    overrides += [line.strip() for line in str(form.get("extra") or "").splitlines() if line.strip() and not line.strip().startswith("#")]
    return overrides


def _field_of(message: str, form: dict, extra: list[str]) -> str:
    """The form field an error is about: a field's key it names, an extra override's key, the
    config group whose option is missing, or the data file; else the form as a whole."""
    named = lambda key: re.search(rf"(?<![\w.]){re.escape(key)}(?![\w])", message)  # noqa: E731
    keys = sorted((f.key for f in fields() if f.kind not in ("lines", "group") and f.key != "name"), key=len, reverse=True)
    for key in keys:
        if named(key):
            return key
    if any(named(line.split("=", 1)[0].lstrip("+~")) for line in extra):
        return "extra"
    for group in GROUPS:  # Hydra names a missing option as 'method/xyz'
        if re.search(rf"'{group}/|(?<![\w.]){group}=", message):
            return group
    path = str(form.get("data.path") or "").strip()
    if (path and path in message) or "training data" in message:
        return "data.path"
    return "form"


def validate(form: dict, runs=None, load_data: bool = True) -> tuple[list[str], dict[str, str]]:
    """``(overrides, errors)``: errors maps a field to the message the command line prints for it
    (``tunelab train OVERRIDES`` would stop with the same words)."""
    from tunelab.config import compose_config

    errors: dict[str, str] = {}
    name = str(form.get("name") or "").strip()
    if runs is not None:
        try:
            folder = runs.folder(name)
            if folder.exists() and any(folder.iterdir()):
                errors["name"] = f"A run named '{name}' already exists: choose another name, or resume it from the Watch view."
        except TunelabError as err:
            errors["name"] = str(err)
    overrides = form_overrides(form)
    extra = [line.strip() for line in str(form.get("extra") or "").splitlines() if line.strip()]
    with _COMPOSE:
        try:
            cfg = compose_config(overrides)
            cfg = _with_checkpoint_format(cfg, form, overrides)
            if load_data:
                from tunelab.engine import check_run

                check_run(cfg)
            else:
                from tunelab.config import validate_config

                validate_config(cfg)
        except TunelabError as err:
            message = str(err)
            errors[_field_of(message, form, extra)] = message
            return overrides, errors
    if "method.save_ckpt_type=" not in " ".join(overrides):
        overrides.append(f"method.save_ckpt_type={cfg.method.save_ckpt_type}")
    return overrides, errors


def _with_checkpoint_format(cfg, form: dict, overrides: list[str]):
    """An empty checkpoint format: a folder chat, eval and export load (hf, or peft for an adapter)."""
    if any(o.startswith("method.save_ckpt_type=") for o in overrides) or "save_ckpt_type" not in cfg.method:
        return cfg
    cfg.method.save_ckpt_type = loadable_ckpt_type(cfg)
    return cfg


def loadable_ckpt_type(cfg) -> str:
    """The checkpoint format chat, eval and export load: peft for an adapter run, else hf."""
    return "peft" if cfg.method.get("peft_config") else "hf"


def defaults(groups: dict) -> dict:
    """The value each form field takes when left empty, for the chosen config groups."""
    from omegaconf import OmegaConf

    from tunelab.config import compose_config

    with _COMPOSE:
        try:
            cfg = compose_config([f"{g}={groups[g]}" for g in GROUPS if groups.get(g)])
        except TunelabError as err:
            return {"error": str(err)}
    out = {}
    for f in fields():
        if f.kind in ("text", "number", "choice") and "." in f.key:
            value = OmegaConf.select(cfg, f.key, default=None)
            out[f.key] = "" if value is None else str(value)
    out["method.save_ckpt_type"] = loadable_ckpt_type(cfg)
    return out
