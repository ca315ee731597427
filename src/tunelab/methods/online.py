"""What the online methods (GRPO, PPO) share: prompts in, completions generated with the current
weights, the completions scored and trained on as packed rows.

``OnlinePolicyOptimization`` holds the options and the steps both methods take the same way:
prompt data, seeded generation with a KV cache, the packed training rows (prompt tokens never in
the loss), the reference model's log-probabilities, completion metrics, the samples file and the
held-out evaluation. Each method adds how it scores completions (``score``) and what it optimises.
"""

import copy
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal, Optional

import torch

from tunelab.data import IGNORE_INDEX, PromptCollator, build_datasets, pack_collate, pad_collate
from tunelab.engine.method import DataSplits
from tunelab.engine.metrics import plot_metric_panels
from tunelab.errors import TunelabError
from tunelab.methods.dpo import token_log_probs, under_reference
from tunelab.methods.fullfinetune_sft import FullFinetuneSFT
from tunelab.models.adapters import changes_sequence, check_adapter_options, check_reference_under_adapter, mutates_base
from tunelab.models.sampling import generating, sample

log = logging.getLogger(__name__)


@dataclass
class OnlinePolicyOptimization(FullFinetuneSFT):
    """The options and steps GRPO and PPO share (not a method of its own)."""

    generates_before_step: ClassVar[bool] = True

    max_prompt_length: int = 512
    """Longest prompt in tokens; longer prompts keep their last tokens (data.overlong=drop drops them)."""
    max_completion_length: int = 256
    """Completions stop at EOS or after this many tokens (then counted as truncated)."""
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    """0: no top-k filtering."""
    log_samples_every_n_steps: int = 10
    """Write a sample of prompts, completions and rewards to OUTPUT_DIR/samples.jsonl (0: never)."""
    reference: Literal["auto", "copy", "adapter_disabled"] = "auto"
    """The model the KL is taken to: the adapter switched off under peft (auto), else a frozen copy
    of the starting model."""
    peft_config: Optional[dict] = None
    adapter_name: str = "default"
    merge_and_unload: bool = False
    save_ckpt_type: Literal["lightning", "hf", "peft"] = "lightning"
    fast_generation: bool = True
    """tunelab's decoding loop (``models.sampling``); false: transformers' generate, the reference."""

    def __post_init__(self):
        self.frozen, self.base_seed, self.tokenizer = {}, 0, None

    def completions_per_prompt(self) -> int:
        return 1

    # -- checks and set-up ------------------------------------------------------------------------

    def check(self) -> None:
        super().check()
        for name in ("max_completion_length", "max_prompt_length"):
            if getattr(self, name) <= 0:
                raise TunelabError(f"method.{name}={getattr(self, name)} must be positive.")
        if self.temperature <= 0:
            raise TunelabError(f"method.temperature={self.temperature} must be positive (completions are sampled).")
        if not 0 < self.top_p <= 1:
            raise TunelabError(f"method.top_p={self.top_p} must be in (0, 1].")
        if self.top_k < 0:
            raise TunelabError(f"method.top_k={self.top_k} must be 0 (no filtering) or positive.")
        if self.reference == "adapter_disabled" and not self.peft_config:
            raise TunelabError("method.reference=adapter_disabled needs an adapter: set method.peft_config, or use method.reference=copy.")
        if self.save_ckpt_type == "peft" and not self.peft_config:
            raise TunelabError("method.save_ckpt_type=peft writes adapter folders, but there is no adapter: set method.peft_config, or use hf.")
        check_adapter_options(self, self.peft_config, self.merge_and_unload)
        check_reference_under_adapter(self.reference, self.peft_config)
        if self.peft_config and changes_sequence(self.peft_config) and self.fast_generation:
            log.info("method.fast_generation switched off: tunelab's decoding loop does not add the adapter's virtual tokens (transformers' generate through peft does)")
            self.fast_generation = False

    def build_data(self, data_cfg, tokenizer) -> DataSplits:
        if data_cfg.format != "prompt":
            raise TunelabError(
                f"{type(self).__name__} generates its own completions from prompts: set data.format=prompt (it is {data_cfg.format!r}); "
                "records need a prompt field (data.prompt_field, default 'prompt') or a chosen/rejected pair to take it from, "
                "and their other fields reach the reward functions."
            )
        self.eos_token_id, self.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
        self.tokenizer = tokenizer
        return DataSplits(*build_datasets(data_cfg, tokenizer, self.max_prompt_length))

    def reference_kind(self) -> str:
        if self.reference != "auto":
            return self.reference
        return "adapter_disabled" if self.peft_config and not mutates_base(self.peft_config) else "copy"

    def frozen_reference(self, model: torch.nn.Module) -> torch.nn.Module:
        """A frozen copy of the starting model, with this method's fast paths (uncompiled)."""
        return self.prepare_model(copy.deepcopy(model), compile=False)

    def prepare_data(self, splits, model, frozen, batches):
        self.frozen = frozen  # reward models, for evaluation as well as training
        return splits, frozen

    def collate_fn(self, tokenizer):
        return PromptCollator(tokenizer.pad_token_id)

    def examples_per_batch(self, batch_size: int) -> int:
        return max(1, batch_size // self.completions_per_prompt())  # prompts; each becomes that many completions

    def estimate(self, model, train_set, device, precision, steps):
        return None  # generation is not modelled yet

    # -- generation ----------------------------------------------------------------------------------

    def generation_seed(self, step: int, micro_batch: int) -> int:
        """Completions depend on the run's seed, the step, the rank and the micro-batch only, so a
        resumed run generates the same ones."""
        rank = torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() else 0
        return (self.base_seed * 1_000_003 + step * 10_007 + rank * 101 + micro_batch) % 2**63

    def generate(self, model: torch.nn.Module, batch: dict, seed: int, greedy: bool = False) -> dict:
        """Complete every prompt of a collated prompt batch ``completions_per_prompt()`` times
        (once if ``greedy``) with the current weights: KV cache, eval mode, the run's precision,
        sampling from a generator seeded by ``seed``. Returns the completions' token lists (cut
        after EOS), texts, whether each hit the length limit, and each one's prompt index."""
        copies = 1 if greedy else self.completions_per_prompt()
        with generating(model) as inner:
            if self.fast_generation:
                generated = sample(
                    self.policy_of(inner), batch["prompt_ids"], batch["prompt_mask"], self.max_completion_length, self.eos_token_id,
                    self.pad_token_id, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, greedy=greedy, repeats=copies,
                    generator=torch.Generator(device=batch["prompt_ids"].device).manual_seed(seed),
                ).tolist()  # fmt: skip
            else:
                generated = self.transformers_generate(inner, batch, seed, greedy, copies)
        completions, truncated = [], []
        for row in generated:
            if self.eos_token_id in row:
                row = row[: row.index(self.eos_token_id) + 1]
                truncated.append(False)
            else:
                truncated.append(True)
            completions.append(row)
        texts = self.tokenizer.batch_decode(completions, skip_special_tokens=True)
        return {"completion_ids": completions, "texts": texts, "truncated": truncated, "prompt_index": [i // copies for i in range(len(completions))]}

    def transformers_generate(self, model: torch.nn.Module, batch: dict, seed: int, greedy: bool, copies: int) -> list[list[int]]:
        """The reference path: transformers' generate with the same options (completion tokens per row)."""
        from transformers import GenerationConfig

        ids = batch["prompt_ids"].repeat_interleave(copies, dim=0)
        mask = batch["prompt_mask"].repeat_interleave(copies, dim=0)
        # Every sampling option is set: transformers fills unset ones from the model's own
        # generation config (a top-k of 50, repetition penalties), which would change the policy sampled.
        sampling = dict(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k) if not greedy else {}
        config = GenerationConfig(
            do_sample=not greedy, **sampling, repetition_penalty=1.0, no_repeat_ngram_size=0, max_new_tokens=self.max_completion_length,
            min_new_tokens=0, eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id, use_cache=True,
        )  # fmt: skip
        with torch.random.fork_rng(devices=[ids.device] if ids.device.type == "cuda" else []):
            torch.manual_seed(seed)
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        return out[:, ids.shape[1] :].tolist()

    def score(self, batch: dict, generated: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Each completion's total reward, and a table of its parts (one column per
        ``reward_names()``, NaN where a part does not apply): (N,) and (N, parts)."""
        raise NotImplementedError

    def reward_names(self) -> list[str]:
        raise NotImplementedError

    # -- the training rows -------------------------------------------------------------------------

    def completion_batch(self, batch: dict, generated: dict, mask_truncated: bool = False) -> dict:
        """One row of prompt + completion per completion (packed into one row with packing on), labels on the completion only
        (on none of it for a truncated completion when ``mask_truncated``), on the batch's device."""
        device = batch["prompt_ids"].device
        prompt_rows = [row[mask.bool()].tolist() for row, mask in zip(batch["prompt_ids"].cpu(), batch["prompt_mask"].cpu())]
        examples = []
        for index, completion, truncated in zip(generated["prompt_index"], generated["completion_ids"], generated["truncated"]):
            prompt = prompt_rows[index]
            supervised = not (mask_truncated and truncated) and len(completion) > 0
            labels = [IGNORE_INDEX] * len(prompt) + (completion if supervised else [IGNORE_INDEX] * len(completion))
            examples.append({"input_ids": prompt + completion, "labels": labels})
        rows = pack_collate(examples) if self.packing else pad_collate(examples, self.pad_token_id)
        return {k: v.to(device) if torch.is_tensor(v) else v for k, v in rows.items()}

    def policy_log_probs(self, model: torch.nn.Module, batch: dict, **forward_kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probabilities of the completion tokens under the sampling distribution (logits
        divided by the temperature), and the completion each belongs to."""
        return token_log_probs(model, batch, self.chunked_loss, self.loss_chunk_size, temperature=self.temperature, **forward_kwargs)

    def reference_log_probs(self, model: torch.nn.Module, frozen: dict, batch: dict) -> torch.Tensor:
        log_probs, _ = under_reference(self.reference_kind(), model, frozen, lambda m: self.policy_log_probs(m, batch))
        return log_probs

    # -- metrics and samples -------------------------------------------------------------------------

    def completion_metrics(self, generated: dict, rewards: torch.Tensor, table: torch.Tensor) -> dict:
        lengths = torch.tensor([len(c) for c in generated["completion_ids"]], dtype=torch.float32)
        metrics = {
            "reward": rewards.mean(), "reward_std": rewards.std() if rewards.numel() > 1 else torch.tensor(0.0),
            "completions/mean_length": lengths.mean(), "completions/max_length": lengths.max(),
            "completions/truncated": torch.tensor(generated["truncated"], dtype=torch.float32).mean(),
        }  # fmt: skip
        for i, name in enumerate(self.reward_names()):
            column = table[:, i]
            present = ~torch.isnan(column)
            metrics[f"rewards/{name}"] = column[present].mean() if present.any() else torch.tensor(0.0)
        return metrics

    def write_samples(self, step: int, batch: dict, generated: dict, rewards: torch.Tensor, table: torch.Tensor) -> None:
        """The first prompt's completions, with their rewards, appended to OUTPUT_DIR/samples.jsonl."""
        path = Path(self.run_dir) / "samples.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        names = self.reward_names()
        with open(path, "a") as f:
            for k in range(min(len(generated["texts"]), self.completions_per_prompt())):
                record = {
                    "step": step, "prompt": json.loads(batch["prompt"][generated["prompt_index"][k]]), "completion": generated["texts"][k],
                    "reward": float(rewards[k]), "rewards": {n: (None if math.isnan(v) else v) for n, v in zip(names, table[k].tolist())},
                    "truncated": generated["truncated"][k],
                }  # fmt: skip
                f.write(json.dumps(record) + "\n")

    def samples_due(self, step: int) -> bool:
        rank = torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() else 0
        every = self.log_samples_every_n_steps
        return bool(every) and step % every == 0 and rank == 0 and self.run_dir is not None

    # -- evaluation and the end ------------------------------------------------------------------------

    def evaluate_prompts(self, model: torch.nn.Module, batch: dict, greedy: bool = True, seed: int = 0) -> tuple[dict, int]:
        """Held-out rewards of one prompt batch (greedy completions by default): summed metrics and
        the number of completions (``evaluation.HeldoutRewardTaskPool``)."""
        generated = self.generate(model, batch, seed, greedy=greedy)
        rewards, table = self.score(batch, generated)
        sums = {"reward": rewards.sum(), "completions/mean_length": torch.tensor(float(sum(len(c) for c in generated["completion_ids"]))),
                "completions/truncated": torch.tensor(float(sum(generated["truncated"])))}  # fmt: skip
        for i, name in enumerate(self.reward_names()):
            sums[f"rewards/{name}"] = torch.nansum(table[:, i])
        sums.update(self.evaluate_completions(model, batch, generated))
        return sums, len(generated["texts"])

    def evaluate_completions(self, model: torch.nn.Module, batch: dict, generated: dict) -> dict:
        """More held-out metrics of generated completions, each summed over them (PPO: the KL)."""
        return {}

    def finalize(self, model: torch.nn.Module, output_dir, tokenizer) -> dict:
        """The reward curve (reward_curve.png, from metrics.csv) and, if asked, the merged model."""
        outputs = {}
        curve = plot_metric_panels(
            Path(output_dir) / "metrics.csv", Path(output_dir) / "reward_curve.png",
            [("reward", [("train/reward", "training (sampled)"), ("val/reward", "held-out")]),
             ("KL to the reference (nats per completion)", [("train/kl", "training (sampled)"), ("val/kl", "held-out (sampled)"),
                                                            ("train/kl_exact", "training (exact, kl_bound)"), ("val/kl_exact", "held-out (exact)")])],
        )  # fmt: skip
        if curve is not None:
            outputs["reward_curve"] = curve
        if self.merge_and_unload and self.peft_config:
            from tunelab.deploy import merge_adapter

            outputs["merged"] = merge_adapter(self.policy_of(model), Path(output_dir) / "merged", tokenizer, getattr(self, "full_precision_base", None))
        return outputs

    def policy_of(self, model: torch.nn.Module) -> torch.nn.Module:
        """The policy inside what the engine trains (PPO trains the policy with its value model)."""
        return model
