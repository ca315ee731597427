"""Checkpoints: save atomically, load for an exact resume.

A checkpoint is a folder that describes itself:
- ``trainer_state.json``: step, epoch, position in the epoch, what the folder holds;
- ``config.yaml``: the resolved config of the run;
- ``state.ckpt``: Fabric's format (``fabric.save``): scheduler, RNG, optimizer if asked, and the
  model weights for ``save_ckpt_type=lightning``;
- for ``save_ckpt_type=hf``: the model in safetensors plus the tokenizer, so that
  ``AutoModelForCausalLM.from_pretrained(folder)`` loads it unchanged;
- for ``save_ckpt_type=peft``: the adapter folder that ``PeftModel.from_pretrained`` loads.

It is written into a hidden temporary folder and renamed into place, so a crash mid-write
leaves the previous checkpoint intact.
"""

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from tunelab.errors import TunelabError
from tunelab.resources import atomic_write_text  # noqa: F401 - re-exported: the engine writes its files with it
from tunelab.models.adapters import load_converted_adapter, save_adapter_folder

STATE_FILE = "state.ckpt"
TRAINER_STATE = "trainer_state.json"


@dataclass
class TrainState:
    global_step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches of the current epoch already trained on


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _trainable_names(model: torch.nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(
    fabric, folder: Path, *, model, optimizer, scheduler, state: TrainState, options, tokenizer, config_yaml: str, method_state: dict | None = None
) -> Path:
    """Write a checkpoint into ``folder`` (replacing one of the same name) and point ``latest`` at
    it. ``method_state``: what the method carries between steps (``Method.state_dict``)."""
    tmp = folder.with_name(f".{folder.name}.tmp")
    if fabric.is_global_zero:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    fabric.barrier()
    payload = {"scheduler": scheduler, "trainer": asdict(state), "rng": _rng_state()}
    if method_state:
        payload["method_state"] = method_state
    if options.save_optimizer_state:
        payload["optimizer"] = optimizer
    module = getattr(model, "module", model)
    filters = {}
    if options.save_ckpt_type == "lightning":
        payload["model"] = model
        if not options.save_full_model:
            trainable = _trainable_names(module)
            filters["model"] = lambda key, _value: key in trainable
    fabric.save(tmp / STATE_FILE, payload, filter=filters or None)
    if fabric.is_global_zero:
        if options.save_ckpt_type in ("hf", "peft"):
            for sub, part in model_parts(module).items():
                _save_part(part, tmp / sub)
            tokenizer.save_pretrained(tmp)
        meta = {
            **asdict(state),
            "ckpt_type": options.save_ckpt_type,
            "has_optimizer": options.save_optimizer_state,
            "full_model": options.save_full_model or options.save_ckpt_type == "hf",
        }
        atomic_write_text(tmp / TRAINER_STATE, json.dumps(meta, indent=2))
        (tmp / "config.yaml").write_text(config_yaml)
        old = folder.with_name(f".{folder.name}.old")
        if folder.exists():
            os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
        atomic_write_text(folder.parent / "latest", folder.name + "\n")
        if options.keep_last_checkpoints:
            prune_checkpoints(folder.parent, options.keep_last_checkpoints)
    fabric.barrier()
    return folder


def prune_checkpoints(checkpoints: Path, keep: int) -> list[Path]:
    """Delete all but the ``keep`` newest ``step-*`` folders (by step); never the one ``latest``
    names. Returns the folders deleted."""
    latest = (checkpoints / "latest").read_text().strip() if (checkpoints / "latest").is_file() else None
    steps = sorted((p for p in checkpoints.glob("step-*") if p.is_dir() and p.name[5:].isdigit()), key=lambda p: int(p.name[5:]))
    gone = [p for p in steps[:-keep] if p.name != latest]
    for folder in gone:
        shutil.rmtree(folder, ignore_errors=True)
    return gone


def resolve_checkpoint(path: str) -> Path:
    """The checkpoint folder named by ``ckpt_path`` (a folder, its state file, or a run's
    ``checkpoints`` folder, meaning its latest checkpoint)."""
    folder = Path(path).expanduser()
    if folder.is_file():
        folder = folder.parent
    if (folder / "latest").is_file():
        folder = folder / (folder / "latest").read_text().strip()
    elif (folder / "checkpoints" / "latest").is_file():
        folder = folder / "checkpoints" / (folder / "checkpoints" / "latest").read_text().strip()
    if not folder.exists():
        raise TunelabError(f"method.ckpt_path '{path}' does not exist. Point it at a checkpoint folder such as OUTPUT_DIR/checkpoints/step-000100.")
    if not (folder / TRAINER_STATE).is_file() or not (folder / STATE_FILE).is_file():
        raise TunelabError(
            f"method.ckpt_path '{path}' is not a tunelab checkpoint: it has no {TRAINER_STATE} and "
            f"{STATE_FILE}. Point it at a folder under OUTPUT_DIR/checkpoints/ written by `tunelab train`."
        )
    return folder


def load_checkpoint(fabric, path: str, *, model, optimizer, scheduler, method=None) -> TrainState:
    """Restore model, optimizer, scheduler, RNG and the method's state in place; return where
    training stopped."""
    folder = resolve_checkpoint(path)
    meta = json.loads((folder / TRAINER_STATE).read_text())
    payload = {"scheduler": scheduler}
    if meta["has_optimizer"]:
        payload["optimizer"] = optimizer
    if meta["ckpt_type"] == "lightning":
        payload["model"] = model
    else:
        for sub, part in model_parts(getattr(model, "module", model)).items():
            _load_part(part, folder / sub)
    try:
        rest = fabric.load(folder / STATE_FILE, payload, strict=meta["full_model"], weights_only=True)
    except Exception as err:
        raise TunelabError(f"Could not restore the checkpoint '{folder}': {err}") from None
    _set_rng_state(rest["rng"])
    if method is not None and "method_state" in rest:
        method.load_state_dict(rest["method_state"])
    return TrainState(**{k: rest["trainer"][k] for k in ("global_step", "epoch", "batches_in_epoch")})


def model_parts(module: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Subfolder -> module to save in it. One part (the model, in the folder itself) unless the
    model is made of several (PPO's policy and value model: ``checkpoint_parts``)."""
    parts = getattr(module, "checkpoint_parts", None)
    return parts() if callable(parts) else {"": module}


def _save_part(part: torch.nn.Module, folder: Path) -> None:
    """A transformers model as a from_pretrained folder, a PeftModel as its adapter folder, any
    other module as its weights in model.safetensors."""
    folder.mkdir(parents=True, exist_ok=True)
    if hasattr(part, "peft_config"):
        save_adapter_folder(part, folder)  # PiSSA/OLoRA converted to apply to the original base
    elif hasattr(part, "save_pretrained"):
        part.save_pretrained(folder, safe_serialization=True)
    else:
        from safetensors.torch import save_file

        save_file({k: v.detach().contiguous() for k, v in part.state_dict().items()}, folder / "model.safetensors")


def _load_part(part: torch.nn.Module, folder: Path) -> None:
    if hasattr(part, "peft_config"):
        _load_adapter_folder(part, folder)
    elif hasattr(part, "bottleneck_config"):
        _load_bottleneck_folder(part, folder)
    else:
        _load_safetensors_folder(part, folder)


def _load_safetensors_folder(module: torch.nn.Module, folder: Path) -> None:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise TunelabError(f"Checkpoint '{folder}' says it is in hf format but holds no .safetensors file.")
    for file in files:
        # strict=False: tied weights (lm_head = embed_tokens) are stored once
        missing_unexpected = module.load_state_dict(load_file(file), strict=False)
        if missing_unexpected.unexpected_keys:
            raise TunelabError(f"Checkpoint '{file}' has weights this model lacks: {missing_unexpected.unexpected_keys[:5]}")


def _load_bottleneck_folder(module: torch.nn.Module, folder: Path) -> None:
    from safetensors.torch import load_file

    from tunelab.models.bottleneck import WEIGHTS_NAME

    file = folder / WEIGHTS_NAME
    if not file.exists():
        raise TunelabError(f"Checkpoint '{folder}' holds no {WEIGHTS_NAME}, so it is not this run's bottleneck adapter.")
    result = module.load_state_dict(load_file(file), strict=False)
    if result.unexpected_keys:
        raise TunelabError(f"Adapter '{file}' has weights this model lacks: {result.unexpected_keys[:5]}")


def _load_adapter_folder(module: torch.nn.Module, folder: Path) -> None:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    name = getattr(module, "active_adapter", "default")
    file = folder / "adapter_model.safetensors"
    if not file.exists():
        file = folder / name / "adapter_model.safetensors"
    if not file.exists():
        raise TunelabError(f"Checkpoint '{folder}' says it is in peft format but holds no adapter_model.safetensors.")
    result = set_peft_model_state_dict(module, load_converted_adapter(module, load_file(file), name), adapter_name=name)
    if result.unexpected_keys:
        raise TunelabError(f"Adapter '{file}' has weights this model lacks: {result.unexpected_keys[:5]}")
