"""A trained reward model as a reward function: a sequence-classification model folder (such as
``method=lm_finetune/bradley_terry_rm`` saves with ``save_ckpt_type=hf``) scores each prompt plus
completion at its last token."""

import json
from pathlib import Path

import torch

from tunelab.errors import TunelabError


class RewardModel:
    """Scores completions with the reward model in ``path``. The method loads it (``load``) and
    hands it to the engine as a frozen model (same device and precision as the policy); it then
    scores ``batches`` of prompt + completion rendered with the reward model's own chat template."""

    needs_model = True

    def __init__(self, path: str, batch_size: int = 16, max_length: int = 1024):
        self.path, self.batch_size, self.max_length = str(path), batch_size, max_length
        self.__name__ = f"reward_model({Path(self.path).name})"
        self.tokenizer = None

    def check(self, option: str) -> None:
        """Refuse a folder that is not a sequence-classification model, before anything loads."""
        from tunelab.resources import resolve_path

        folder = resolve_path(self.path, option)
        config_file = folder / "config.json"
        if not config_file.exists():
            raise TunelabError(f"{option}='{self.path}' has no config.json: it is not a Hugging Face model folder (a reward model saved with save_ckpt_type=hf).")
        config = json.loads(config_file.read_text())
        architectures = config.get("architectures") or []
        if not any(a.endswith("ForSequenceClassification") for a in architectures) or config.get("num_labels", len(config.get("id2label", {})) or 1) != 1:
            raise TunelabError(
                f"{option}='{self.path}' is not a one-output sequence-classification model (architectures: {architectures or 'none'}). "
                "Train one with method=lm_finetune/bradley_terry_rm and method.save_ckpt_type=hf, and point at its checkpoint folder."
            )
        self.folder = folder

    def load(self) -> torch.nn.Module:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.folder)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        return AutoModelForSequenceClassification.from_pretrained(self.folder, dtype=torch.float32)

    def batches(self, prompts: list[list[dict]], completions: list[str]):
        """Right-padded CPU batches of the conversations to score (long ones keep their last tokens)."""
        from tunelab.data import pad_collate, render

        rows = []
        for messages, completion in zip(prompts, completions):
            text = render(self.tokenizer, messages + [{"role": "assistant", "content": completion}])
            rows.append(self.tokenizer(text, add_special_tokens=False)["input_ids"][-self.max_length :])
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start : start + self.batch_size]
            batch = pad_collate([{"input_ids": r, "labels": r} for r in chunk], self.tokenizer.pad_token_id)
            yield {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
