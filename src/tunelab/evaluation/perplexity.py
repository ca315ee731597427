"""Perplexity of a model on a data set: exp of the mean negative log-likelihood per scored token.

Chat records score the assistant replies only (the tokens training supervises, through the same
loss mask); texts score every token. A sequence longer than the model's window (``max_length``)
is scored in overlapping windows: each window moves ``stride`` tokens and scores only the tokens
no earlier window scored, so every token after the first is predicted from at least
``max_length - stride`` tokens of context.
"""

import math
from dataclasses import dataclass
from pathlib import Path

from tunelab.data import IGNORE_INDEX
from tunelab.errors import TunelabError
from tunelab.evaluation.items import EvalItem
from tunelab.progress import progress_bar


@dataclass
class PerplexityReport:
    model: str
    data: str
    perplexity: float
    mean_nll: float
    tokens: int
    items: int
    windows: int
    per_item: list[dict]  # {"id", "nll", "tokens"}: summed NLL and scored tokens of each item

    def render(self) -> str:
        return (f"{self.model} on {self.data}: perplexity {self.perplexity:.4f} (mean NLL {self.mean_nll:.4f} over "
                f"{self.tokens:,} scored tokens of {self.items} items, {self.windows} windows)")  # fmt: skip

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


def windows(ids: list[int], labels: list[int], max_length: int, stride: int) -> list[tuple[list[int], list[int]]]:
    """``(ids, labels)`` cut into windows of at most ``max_length`` tokens that start ``stride``
    apart; a label is kept in the first window where it is predicted, -100 elsewhere."""
    if len(ids) <= max_length:
        return [(ids, labels)]
    out, scored_until = [], 0  # labels at positions < scored_until were scored by an earlier window
    for start in range(0, len(ids), stride):
        end = min(start + max_length, len(ids))
        window_labels = [IGNORE_INDEX if start + k < max(scored_until, start + 1) else label for k, label in enumerate(labels[start:end])]
        out.append((ids[start:end], window_labels))
        scored_until = end
        if end == len(ids):
            break
    return out


def _rows(item: EvalItem, tokenizer) -> tuple[list[int], list[int]]:
    from tunelab.data import tokenize_conversation, tokenize_text

    if isinstance(item.prompt, str):
        return tokenize_text(tokenizer, item.prompt)
    return tokenize_conversation(tokenizer, item.messages)


def perplexity(model, items: list[EvalItem], data_name: str = "", max_length: int | None = None, stride: int | None = None,
               batch_size: int = 8, progress=None) -> PerplexityReport:  # fmt: skip
    """Perplexity of ``model`` (a LocalModel or an EndpointModel) on ``items``; ``progress`` (a bar
    to update per scored window) replaces the bar this function shows otherwise."""
    from tunelab.evaluation.models import EndpointModel

    if isinstance(model, EndpointModel):
        return _endpoint_perplexity(model, items, data_name, progress)
    max_length = max_length or min(model.max_length, 2048)
    stride = stride or max(1, max_length // 2)
    if not 0 < stride <= max_length:
        raise TunelabError(f"--stride {stride} must be between 1 and the window length {max_length}.")
    rows = []  # (item index, ids, labels)
    for k, item in enumerate(items):
        if item.messages is None and not isinstance(item.prompt, str):
            raise TunelabError(f"Data {item.where}: a prompt without a reply has no tokens to score; perplexity needs a chat or text format.")
        ids, labels = _rows(item, model.tokenizer)
        rows += [(k, w_ids, w_labels) for w_ids, w_labels in windows(ids, labels, max_length, stride)]
    sums = [[0.0, 0] for _ in items]
    order = sorted(range(len(rows)), key=lambda r: -len(rows[r][1]))
    with progress_bar(len(rows), enabled=progress is None, desc=f"Perplexity {Path(data_name).name}".strip()) as own:
        for start in range(0, len(order), batch_size):
            chunk = [rows[r] for r in order[start : start + batch_size]]
            for (k, _, _), (nll, count) in zip(chunk, model.token_losses([(ids, labels) for _, ids, labels in chunk])):
                sums[k][0] += nll
                sums[k][1] += count
            (progress or own).update(len(chunk))
    return _report(model.name, data_name, items, sums, len(rows))


def _report(name: str, data_name: str, items: list[EvalItem], sums: list, n_windows: int) -> PerplexityReport:
    total_nll = sum(s[0] for s in sums)
    tokens = sum(s[1] for s in sums)
    if tokens == 0:
        raise TunelabError(f"No token of {data_name or 'the data'} was scored (no assistant replies or empty texts).")
    mean = total_nll / tokens
    per_item = [{"id": item.id, "nll": nll, "tokens": count} for item, (nll, count) in zip(items, sums)]
    return PerplexityReport(name, data_name, math.exp(min(mean, 50)), mean, tokens, len(items), n_windows, per_item)


def _endpoint_perplexity(model, items: list[EvalItem], data_name: str, progress) -> PerplexityReport:
    """Through /v1/completions with echo: texts score every token after the first; chat records
    need the model's tokenizer (--tokenizer) to render the template and find the replies."""
    sums = []
    for item in items:
        if isinstance(item.prompt, str):
            text, spans = item.prompt, None
        else:
            if model.tokenizer_path is None:
                raise TunelabError("Perplexity of chat records through an endpoint needs the model's chat template: give --tokenizer MODEL_FOLDER.")
            from tunelab.data.tokenize import assistant_spans
            from tunelab.models import CausalLMPool

            if model.tokenizer is None:
                model.tokenizer = CausalLMPool(model_path=model.tokenizer_path).load_tokenizer()
            text, spans = assistant_spans(model.tokenizer, item.messages)
        logprobs, offsets = model.text_logprobs(text)
        nll, count = 0.0, 0
        for k, (lp, offset) in enumerate(zip(logprobs, offsets)):
            if k == 0 or lp is None:
                continue
            if spans is None or any(a <= offset < b for a, b in spans):
                nll -= lp
                count += 1
        sums.append([nll, count])
        if progress is not None:
            progress.update(1)
    return _report(model.name, data_name, items, sums, len(items))
