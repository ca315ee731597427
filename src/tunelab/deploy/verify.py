"""Does an export compute what its source computed?

Both run on the same texts (a shipped set of GSM8K conversations, or ``--verify-data``): every
position's logits are compared (the largest absolute difference and how often the top token
agrees), the perplexity of each on the texts' scored tokens (the replies of a chat, every token of
a plain text), and greedy continuations of the prompts. The export passes when the logit difference
and the perplexity ratio stay within the tolerance of its number format (``TOLERANCES``).

A side is anything that maps token ids to logits (``Scorer``): a transformers model, or llama.cpp
(``deploy.llama_cpp``), so the same report serves merged folders and GGUF files.
"""

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from tunelab.errors import TunelabError

DEFAULT_DATA = "pkg://tunelab/demo_data/gsm8k_demo.jsonl"
DEFAULT_START, DEFAULT_LIMIT = 184, 16  # the shipped file's last 16 problems (the demo trains on its first 160)
GREEDY_TOKENS = 24


@dataclass(frozen=True)
class Tolerance:
    max_logit_difference: float | None  # None: not a criterion (coarse quantization moves logits a lot)
    perplexity_ratio: float  # |perplexity(export) / perplexity(source) - 1| at most this


# Bounds a faithful export stays well inside, set from SmolLM2-135M (logits of magnitude ~20; a
# bfloat16 copy of its merged LoRA run: largest logit difference 2.9, perplexity ratio 1.008) and
# tiny random Llamas. A wrong permutation or a perturbed tensor lands far outside them (tests).
TOLERANCES = {
    "float32": Tolerance(1e-3, 1e-4),
    "float16": Tolerance(1.0, 5e-3),
    "bfloat16": Tolerance(8.0, 3e-2),
    "q8_0": Tolerance(8.0, 3e-2),
    "q5_0": Tolerance(None, 0.10),
    "q5_1": Tolerance(None, 0.10),
    "q4_0": Tolerance(None, 0.25),
    "q4_1": Tolerance(None, 0.25),
}
TOLERANCES |= {"f32": TOLERANCES["float32"], "f16": TOLERANCES["float16"], "bf16": TOLERANCES["bfloat16"]}


class Scorer(Protocol):
    name: str

    def logits(self, ids: list[int]) -> torch.Tensor:
        """(len(ids), vocab) float32 next-token logits of one sequence."""

    def greedy(self, ids: list[int], max_new_tokens: int) -> list[int]:
        """The greedy continuation of ``ids`` (stopping at an end-of-sequence token)."""


class TransformersScorer:
    """A transformers model (or a peft model on its base) on the CPU or GPU."""

    def __init__(self, model, name: str, eos_token_ids: list[int]):
        self.model, self.name, self.eos_token_ids = model.eval(), name, eos_token_ids
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def logits(self, ids: list[int]) -> torch.Tensor:
        return self.model(input_ids=torch.tensor([ids], device=self.device)).logits[0].float().cpu()

    @torch.no_grad()
    def greedy(self, ids: list[int], max_new_tokens: int) -> list[int]:
        out = self.model.generate(
            input_ids=torch.tensor([ids], device=self.device), attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=self.device),
            max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None, top_k=None,
            eos_token_id=self.eos_token_ids or None, pad_token_id=(self.eos_token_ids or [0])[0],
        )  # fmt: skip
        return until_eos(out[0, len(ids) :].tolist(), self.eos_token_ids)


def until_eos(tokens: list[int], eos_token_ids: list[int]) -> list[int]:
    for k, token in enumerate(tokens):
        if token in eos_token_ids:
            return tokens[: k + 1]
    return tokens


@dataclass
class VerificationText:
    ids: list[int]
    labels: list[int]  # -100 where a token is not scored (prompts of a chat)
    prompt_ids: list[int]  # what greedy continuation starts from
    text: str = ""  # the text the ids tokenize (a chat through its template), for tokenizer checks
    messages: list | None = None  # the conversation, for chat checks


def verification_texts(tokenizer, data: str | None = None, start: int | None = None, limit: int | None = None) -> list[VerificationText]:
    """The texts both sides run on: ``data`` (any format ``tunelab eval`` reads) rows ``start`` ..
    ``start + limit``, or the shipped GSM8K conversations. Chats go through the tokenizer's chat
    template (tunelab's fallback template without one), as in training."""
    from tunelab.data import render, tokenize_conversation, tokenize_text
    from tunelab.evaluation.items import load_items

    if data is None:
        data, start, limit = DEFAULT_DATA, DEFAULT_START if start is None else start, DEFAULT_LIMIT if limit is None else limit
    items = load_items(data, start=start or 0, limit=limit)
    texts = []
    for item in items:
        if isinstance(item.prompt, str):
            ids, labels = tokenize_text(tokenizer, item.prompt)
            texts.append(VerificationText(list(ids), list(labels), list(ids[: max(1, len(ids) // 2)]), item.prompt))
            continue
        messages = item.messages or item.prompt + [{"role": "assistant", "content": item.reference or ""}]
        ids, labels = tokenize_conversation(tokenizer, messages)
        prompt_ids = tokenizer(render(tokenizer, item.prompt, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
        texts.append(VerificationText(list(ids), list(labels), list(prompt_ids), render(tokenizer, messages), messages))
    if not texts:
        raise TunelabError(f"The verification data '{data}' gave no texts to compare on.")
    return texts


@dataclass
class Verification:
    source: str
    export: str
    number_format: str
    texts: int
    scored_tokens: int
    max_logit_difference: float
    top1_agreement: float
    perplexity_source: float
    perplexity_export: float
    greedy_identical: int
    greedy_prompts: int
    greedy_tokens: int
    tolerance: dict
    passed: bool
    first_greedy_difference: dict | None = None
    extra: dict = field(default_factory=dict)

    @property
    def perplexity_ratio(self) -> float:
        return self.perplexity_export / self.perplexity_source

    def as_dict(self) -> dict:
        return asdict(self) | {"perplexity_ratio": self.perplexity_ratio}

    def summary(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        bound = self.tolerance.get("max_logit_difference")
        return (
            f"verification {verdict} ({self.number_format}, {self.texts} texts, {self.scored_tokens} scored tokens): "
            f"largest logit difference {self.max_logit_difference:.3g}{f' (tolerance {bound:g})' if bound is not None else ''}, "
            f"top-1 agreement {self.top1_agreement:.2%}, perplexity {self.perplexity_source:.4f} (source) vs "
            f"{self.perplexity_export:.4f} (export; ratio {self.perplexity_ratio:.5f}, tolerance ±{self.tolerance['perplexity_ratio']:g}), "
            f"greedy continuations identical {self.greedy_identical}/{self.greedy_prompts}"
        )


def verify(source: Scorer, export: Scorer, texts: list[VerificationText], number_format: str, greedy_prompts: int = 8,
           greedy_tokens: int = GREEDY_TOKENS) -> Verification:  # fmt: skip
    """Run both sides on ``texts`` and judge the export by ``TOLERANCES[number_format]``."""
    if number_format not in TOLERANCES:
        raise TunelabError(f"No verification tolerance for '{number_format}'; known formats: {', '.join(sorted(TOLERANCES))}.")
    from tunelab.progress import progress_bar

    tolerance = TOLERANCES[number_format]
    worst, agree, positions = 0.0, 0, 0
    nll = [0.0, 0.0]
    scored = 0
    prompts = texts[:greedy_prompts]
    bar = progress_bar(len(texts) + len(prompts), desc=f"Verifying {Path(export.name).name}")
    for text in texts:
        a, b = source.logits(text.ids), export.logits(text.ids)
        if a.shape != b.shape:
            raise TunelabError(f"The export gives logits of shape {tuple(b.shape)} where the source gives {tuple(a.shape)}: the vocabularies differ.")
        worst = max(worst, float((a - b).abs().max()))
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        positions += a.shape[0]
        targets = torch.tensor(text.labels[1:])
        keep = targets != -100
        if keep.any():
            for side, logits in enumerate((a, b)):
                nll[side] += float(torch.nn.functional.cross_entropy(logits[:-1][keep], targets[keep], reduction="sum"))
            scored += int(keep.sum())
        bar.update(1)
    if scored == 0:
        bar.close()
        raise TunelabError("No token of the verification texts is scored (no replies and no plain text).")
    identical, first_difference = 0, None
    for k, text in enumerate(prompts):
        a, b = source.greedy(text.prompt_ids, greedy_tokens), export.greedy(text.prompt_ids, greedy_tokens)
        bar.update(1)
        if a == b:
            identical += 1
        elif first_difference is None:
            at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            first_difference = {"text": k, "position": at, "source": a[at : at + 4], "export": b[at : at + 4]}
    bar.close()
    ppl = [math.exp(min(total / scored, 50)) for total in nll]
    ratio_ok = abs(ppl[1] / ppl[0] - 1) <= tolerance.perplexity_ratio
    logits_ok = tolerance.max_logit_difference is None or worst <= tolerance.max_logit_difference
    return Verification(
        source.name, export.name, number_format, len(texts), scored, worst, agree / positions, ppl[0], ppl[1], identical, len(prompts),
        greedy_tokens, asdict(tolerance), ratio_ok and logits_ok, first_difference,
    )  # fmt: skip
