"""Fold a PEFT adapter into its base weights and save a plain transformers model."""

from pathlib import Path


def merge_adapter(peft_model, folder: Path, tokenizer=None) -> Path:
    """Merge ``peft_model``'s adapter into the base weights (in place) and save the merged model
    as safetensors; ``AutoModelForCausalLM.from_pretrained(folder)`` loads it."""
    merged = peft_model.merge_and_unload()
    folder.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(folder, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder
