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

STATE_FILE = "state.ckpt"
TRAINER_STATE = "trainer_state.json"


@dataclass
class TrainState:
    global_step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches of the current epoch already trained on


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


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


def save_checkpoint(fabric, folder: Path, *, model, optimizer, scheduler, state: TrainState, options, tokenizer, config_yaml: str) -> Path:
    """Write a checkpoint into ``folder`` (replacing one of the same name) and point ``latest`` at it."""
    tmp = folder.with_name(f".{folder.name}.tmp")
    if fabric.is_global_zero:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    fabric.barrier()
    payload = {"scheduler": scheduler, "trainer": asdict(state), "rng": _rng_state()}
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
        if options.save_ckpt_type in ("hf", "peft"):  # a PeftModel saves just its adapter
            module.save_pretrained(tmp, safe_serialization=True)
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
    fabric.barrier()
    return folder


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


def load_checkpoint(fabric, path: str, *, model, optimizer, scheduler) -> TrainState:
    """Restore model, optimizer, scheduler and RNG in place; return where training stopped."""
    folder = resolve_checkpoint(path)
    meta = json.loads((folder / TRAINER_STATE).read_text())
    payload = {"scheduler": scheduler}
    if meta["has_optimizer"]:
        payload["optimizer"] = optimizer
    if meta["ckpt_type"] == "lightning":
        payload["model"] = model
    elif meta["ckpt_type"] == "peft":
        _load_adapter_folder(getattr(model, "module", model), folder)
    else:
        _load_safetensors_folder(getattr(model, "module", model), folder)
    try:
        rest = fabric.load(folder / STATE_FILE, payload, strict=meta["full_model"], weights_only=True)
    except Exception as err:
        raise TunelabError(f"Could not restore the checkpoint '{folder}': {err}") from None
    _set_rng_state(rest["rng"])
    return TrainState(**{k: rest["trainer"][k] for k in ("global_step", "epoch", "batches_in_epoch")})


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


def _load_adapter_folder(module: torch.nn.Module, folder: Path) -> None:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    name = getattr(module, "active_adapter", "default")
    file = folder / "adapter_model.safetensors"
    if not file.exists():
        file = folder / name / "adapter_model.safetensors"
    if not file.exists():
        raise TunelabError(f"Checkpoint '{folder}' says it is in peft format but holds no adapter_model.safetensors.")
    result = set_peft_model_state_dict(module, load_file(file), adapter_name=name)
    if result.unexpected_keys:
        raise TunelabError(f"Adapter '{file}' has weights this model lacks: {result.unexpected_keys[:5]}")
