"""Fold an adapter into its base weights and save a plain transformers model."""

import copy
import json
import logging
from pathlib import Path
from typing import Callable, Optional

import torch

from tunelab.errors import TunelabError
from tunelab.models.pool import is_quantized

log = logging.getLogger(__name__)

CHECK_TEXT = "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May."


def merge_adapter(model, folder: Path, tokenizer=None, full_precision_base: Optional[Callable[[], torch.nn.Module]] = None) -> Path:
    """Merge ``model``'s adapter into the base weights and save the merged model as safetensors;
    ``AutoModelForCausalLM.from_pretrained(folder)`` loads it.

    An unquantised base is merged in place. A quantised base (QLoRA) is not: its weights would be
    rounded again. The adapter is put on the base loaded in full precision
    (``full_precision_base()``) and merged there, and the merged model's logits are compared with
    the adapter model's on a fixed text (``merge_check.json`` in the folder: the difference is the
    base's quantisation error, not the merge's)."""
    check = None
    if is_quantized(model):
        if full_precision_base is None:
            raise TunelabError("This adapter sits on a quantised base; merging needs the base in full precision, and none was given.")
        merged = _merge_onto(full_precision_base(), model)
        check = compare_logits(merged, model, tokenizer)
        log.info("Merged onto the full-precision base: largest logit difference to the QLoRA model %.4f, top-1 agreement %.1f%%",
                 check["max_logit_difference"], 100 * check["top1_agreement"])  # fmt: skip
    else:
        merged = model.merge_and_unload()
    folder.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(folder, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    if check is not None:
        (folder / "merge_check.json").write_text(json.dumps(check, indent=2))
    return folder


def _merge_onto(base: torch.nn.Module, adapter_model) -> torch.nn.Module:
    """The adapter of ``adapter_model`` (a PeftModel) applied to ``base`` and merged into it."""
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    name = adapter_model.active_adapter
    config = copy.deepcopy(adapter_model.peft_config[name])
    if hasattr(config, "init_lora_weights"):
        config.init_lora_weights = True  # the weights are copied next; no initialisation that changes the base
    fresh = get_peft_model(base, config, adapter_name=name)
    state = {k: v.detach().to(torch.float32) for k, v in get_peft_model_state_dict(adapter_model, adapter_name=name).items()}
    result = set_peft_model_state_dict(fresh, state, adapter_name=name)
    if result.unexpected_keys:
        raise TunelabError(f"The adapter's weights do not fit the full-precision base: {result.unexpected_keys[:5]}")
    return fresh.merge_and_unload()


def compare_logits(a: torch.nn.Module, b: torch.nn.Module, tokenizer=None) -> dict:
    """Largest absolute logit difference and top-1 agreement of two models on a fixed text."""
    if tokenizer is not None:
        ids = tokenizer(CHECK_TEXT, return_tensors="pt")["input_ids"]
    else:
        ids = torch.arange(1, 33)[None] % a.config.vocab_size
    outputs = []
    for model in (a, b):
        was_training = model.training
        model.eval()
        with torch.no_grad():
            device = next(model.parameters()).device
            outputs.append(model(input_ids=ids.to(device)).logits.float().cpu())
        model.train(was_training)
    x, y = outputs
    return {"max_logit_difference": float((x - y).abs().max()), "top1_agreement": float((x.argmax(-1) == y.argmax(-1)).float().mean()),
            "tokens": int(ids.numel())}  # fmt: skip
