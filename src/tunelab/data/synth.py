"""Instruction data written by a language model: new tasks from a few seed examples
(Self-Instruct), and paraphrases of existing instructions.

A model is reached through one small interface, ``complete(messages, max_tokens, temperature)``:
``LocalModelClient`` runs a tunelab model pool here (transformers ``generate`` over the chat
template), ``EndpointClient`` asks an OpenAI-compatible server (vLLM, llama.cpp, OpenAI, ...).

Nothing a model writes is trusted: each answer is parsed leniently, checked (an instruction and
an output, sane lengths, no leftover chat tokens or layout placeholders) and deduplicated by
ROUGE-L F against the seeds and everything kept so far, as Self-Instruct does (a new instruction
whose ROUGE-L F with any earlier one reaches 0.7 is a duplicate). Every rejection is counted by
reason. Examples are written in alpaca format, each with its provenance, and only when the run
ends: an endpoint that fails half way writes nothing.
"""

import os
import random
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

from tunelab.data.files import WRITABLE, Finding, scan_file, write_records
from tunelab.data.readers import Record
from tunelab.data.transform import check_format_fields, convert_records, findings_lines, format_config
from tunelab.errors import TunelabError
from tunelab.progress import progress_bar

SIMILARITY = 0.7  # Self-Instruct's ROUGE-L threshold for "the same instruction"


# ---------------------------------------------------------------- clients


class Client(Protocol):
    name: str
    """The generator, as written in each example's provenance (a model path, or model @ URL)."""
    truncated: bool
    """Whether the last answer stopped at max_tokens rather than at its end (a client without
    the attribute counts as never truncating)."""

    def complete(self, messages: list[dict], max_tokens: int = 256, temperature: float = 0.7) -> str: ...


class LocalModelClient:
    """A model run here: a tunelab model pool (``CausalLMPool``) or a model path (a Hugging Face
    folder, a .gguf file, ``pkg://...``). Loaded on first use; prompts are rendered with the
    tokenizer's chat template and sampled with transformers ``generate``. Each call draws from
    its own seed (``seed`` plus the call's number), so a run is reproducible and the process's
    random state is left alone."""

    def __init__(self, pool, *, seed: int = 0, top_p: float = 0.95, device: str | None = None):
        if isinstance(pool, (str, Path)):
            from tunelab.models import CausalLMPool

            pool = CausalLMPool(model_path=str(pool))
        self.pool = pool
        self.name = str(getattr(pool, "model_path", None) or "a randomly initialised model")
        self.seed, self.top_p, self.device = seed, top_p, device
        self.calls = 0
        self.truncated = False
        self._model = self._tokenizer = None

    def _load(self):
        if self._model is None:
            import torch

            self.device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
            self._tokenizer = self.pool.load_tokenizer()
            # a model built from a config (a random test model) takes its vocabulary from the tokenizer, as training does
            self._model = self.pool.load_model(vocab_size=len(self._tokenizer), pad_token_id=self._tokenizer.pad_token_id).to(self.device).eval()
        return self._model, self._tokenizer

    def complete(self, messages: list[dict], max_tokens: int = 256, temperature: float = 0.7) -> str:
        import torch

        from tunelab.data.tokenize import render

        model, tokenizer = self._load()
        encoded = tokenizer(render(tokenizer, messages, add_generation_prompt=True), return_tensors="pt", add_special_tokens=False).to(self.device)
        sampling = {"do_sample": True, "temperature": temperature, "top_p": self.top_p} if temperature > 0 else {"do_sample": False}
        devices = [torch.cuda.current_device()] if self.device.startswith("cuda") else []
        with torch.random.fork_rng(devices=devices), torch.inference_mode():
            torch.manual_seed(self.seed * 1_000_003 + self.calls)
            self.calls += 1
            out = model.generate(**encoded, max_new_tokens=max_tokens, pad_token_id=tokenizer.pad_token_id, **sampling)
        new = out[0, encoded["input_ids"].shape[1] :].tolist()
        ends = model.generation_config.eos_token_id
        ends = set(ends if isinstance(ends, list) else [ends, tokenizer.eos_token_id])
        self.truncated = len(new) >= max_tokens and new[-1] not in ends
        return tokenizer.decode(new, skip_special_tokens=True)


class EndpointClient:
    """An OpenAI-compatible chat completions endpoint (``base_url`` such as
    http://localhost:8000/v1), through the official ``openai`` client. ``api_key`` defaults to
    $OPENAI_API_KEY, or a placeholder for local servers that need none."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None, timeout: float = 30, max_retries: int = 1):
        try:
            import openai
        except ImportError:
            raise TunelabError("Generating through an endpoint needs the openai package: pip install openai (or pip install 'tunelab[synth]').") from None
        self._openai = openai
        self.base_url, self.model, self.timeout, self.max_retries = base_url, model, timeout, max_retries
        self.name = f"{model} @ {base_url}"
        self.truncated = False
        key = api_key or os.environ.get("OPENAI_API_KEY") or "no-key"
        self._client = openai.OpenAI(base_url=base_url, api_key=key, timeout=timeout, max_retries=max_retries)

    def complete(self, messages: list[dict], max_tokens: int = 256, temperature: float = 0.7) -> str:
        openai = self._openai
        tries = f"{self.max_retries + 1} tries" if self.max_retries else "1 try"
        try:
            response = self._client.chat.completions.create(model=self.model, messages=messages, max_tokens=max_tokens, temperature=temperature)
        except openai.APITimeoutError:
            raise TunelabError(
                f"The endpoint {self.base_url} did not answer within {self.timeout:g} s ({tries}). Check that the server is up "
                "and not overloaded, or allow more time (timeout)."
            ) from None
        except openai.APIConnectionError as err:
            cause = err.__cause__ or err
            raise TunelabError(
                f"The endpoint {self.base_url} did not answer within {self.timeout:g} s ({tries}): could not connect ({cause}). "
                "Check the URL (it usually ends in /v1) and that the server is running."
            ) from None
        except openai.APIStatusError as err:
            raise TunelabError(
                f"The endpoint {self.base_url} refused the request for model '{self.model}' (HTTP {err.status_code}: {err.message}). "
                "Check the model name and the API key."
            ) from None
        except openai.APIError as err:
            raise TunelabError(f"The endpoint {self.base_url} answered with something that is not a chat completion ({err}).") from None
        choices = getattr(response, "choices", None) or []
        self.truncated = bool(choices) and choices[0].finish_reason == "length"
        content = choices[0].message.content if choices and choices[0].message else None
        return content or ""  # an empty answer is rejected like any other unusable one


# ---------------------------------------------------------------- similarity


class _Words:
    """ROUGE's tokenizer for any script: lowercased word characters (rouge_score's default keeps
    only a-z and 0-9, so non-English instructions would all look empty, hence never similar)."""

    def tokenize(self, text: str) -> list[str]:
        return re.findall(r"\w+", text.lower())


class Similarity:
    """The highest ROUGE-L F of a text against a growing set of texts.

    ROUGE-L F is 2 x LCS / (m + n), and the longest common subsequence is at most the words the
    two texts share, so 2 x shared / (m + n) bounds it from above: texts are scored with
    rouge_score only in the order of that bound, until the bound falls below the best score.
    This keeps the exact maximum and scores a handful of texts instead of all of them."""

    def __init__(self, texts=()):
        from rouge_score import rouge_scorer

        self._words = _Words()
        self._scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=self._words)
        self._texts: list[str] = []
        self._bags: list[Counter] = []
        for text in texts:
            self.add(text)

    def add(self, text: str) -> None:
        self._texts.append(text)
        self._bags.append(Counter(self._words.tokenize(text)))

    def best(self, text: str) -> float:
        bag = Counter(self._words.tokenize(text))
        size = sum(bag.values())
        bounds = sorted(
            ((2 * sum((bag & other).values()) / (size + sum(other.values())) if size + sum(other.values()) else 0.0), i)
            for i, other in enumerate(self._bags)
        )
        best = 0.0
        for bound, i in reversed(bounds):
            if bound <= best:
                break
            best = max(best, self._scorer.score(self._texts[i], text)["rougeL"].fmeasure)
        return best


def rouge_l(a: str, b: str) -> float:
    """ROUGE-L F of two texts (with the same tokenizer as the deduplication)."""
    return Similarity([a]).best(b)


# ---------------------------------------------------------------- parsing and checks

# A label at the start of a line, in the layouts models drift into: "Instruction:", "Instructions:",
# "**Input:**", "### Output", "1. Task:", "Response:". A bare label on its own line counts too.
_LABEL = re.compile(
    r"^[ \t>*#_-]*(?:\d+[.)][ \t]*)?(?:new[ \t]+)?(?P<kind>instructions?|task|input|output|response|answer)(?:[ \t]*\d+)?"
    r"[ \t]*\**[ \t]*(?::|：|$)[ \t*]*",
    re.IGNORECASE | re.MULTILINE,
)
_KIND = {"instruction": "instruction", "instructions": "instruction", "task": "instruction", "input": "input",
         "output": "output", "response": "output", "answer": "output"}  # fmt: skip
_NO_INPUT = {"", "none", "n/a", "na", "-", "no input", "<noinput>", "<no input>", "(none)", "(optional)", "optional", "empty", "null", "nothing"}
# What a well-formed field never holds: chat special tokens, prompt-format tags, placeholders.
_MARKERS = re.compile(
    r"<\|[^|>]{0,40}\|>|</?s>|\[/?INST\]|<</?SYS>>|\{(?:instruction|input|output)\}|<(?:instruction|input|output|noinput|task|answer)>"
    r"|^\s*\.\.\.\s*$",
    re.IGNORECASE | re.MULTILINE,
)
_SEPARATOR = re.compile(r"(?:\n[ \t]*(?:-{3,}|={3,}|\*{3,}|#{1,6})[ \t]*)+\s*$")


@dataclass
class Limits:
    """What a kept example may look like."""

    min_instruction_words: int = 3
    max_instruction_words: int = 150  # Self-Instruct's bounds
    max_input_chars: int = 4000
    max_output_chars: int = 6000


def _clean(text: str) -> str:
    return _SEPARATOR.sub("", text).strip().strip("*").strip()


def parse_example(text: str) -> tuple[dict | None, str | None]:
    """``Instruction: ...`` [``Input: ...``] ``Output: ...`` -> ({instruction, input, output}, None),
    or (None, reason). Leniently: labels in any case, plural, bold or as headers, synonyms (Task,
    Response, Answer), prose before the first instruction; the output runs to the next
    instruction (a model that starts a second task has finished the first)."""
    labels = list(_LABEL.finditer(text))
    first = next((i for i, m in enumerate(labels) if _KIND[m["kind"].lower()] == "instruction"), None)
    if first is None:
        return None, "unparseable"
    parts: dict[str, str] = {}
    for i in range(first, len(labels)):
        kind = _KIND[labels[i]["kind"].lower()]
        if kind in parts:
            if kind == "instruction" or "output" in parts:
                break
            continue
        if "output" in parts:
            continue  # an "Answer:" inside the output belongs to it
        end = len(text)
        if kind == "output":  # the output runs on to the next instruction
            end = next((m.start() for m in labels[i + 1 :] if _KIND[m["kind"].lower()] == "instruction"), len(text))
        elif i + 1 < len(labels):
            end = labels[i + 1].start()
        parts[kind] = text[labels[i].end() : end]
    if "output" not in parts:
        return None, "unparseable"
    extra = _clean(parts.get("input", ""))
    example = {"instruction": _clean(parts["instruction"]), "input": "" if extra.lower() in _NO_INPUT else extra, "output": _clean(parts["output"])}
    return example, None


def check_example(example: dict, limits: Limits | None = None) -> str | None:
    """The reason an example is unusable, or None."""
    limits = limits or Limits()
    if not example["instruction"] or not example["output"]:
        return "empty"
    if any(_MARKERS.search(example[k]) for k in ("instruction", "input", "output")):
        return "template_marker"
    words = len(example["instruction"].split())
    if not limits.min_instruction_words <= words <= limits.max_instruction_words:
        return "length"
    if len(example["input"]) > limits.max_input_chars or len(example["output"]) > limits.max_output_chars:
        return "length"
    return None


# ---------------------------------------------------------------- reports and shared steps


@dataclass
class SynthReport:
    out: Path
    generator: str
    method: str
    requested: int
    """Examples asked for (synthesize: n; augment: records x n_per_example)."""
    attempts: int = 0
    """Requests sent to the model."""
    generated: int = 0
    """Answers received."""
    kept: int = 0
    """New examples written."""
    rejected: dict[str, int] = field(default_factory=dict)
    """Answers left out, per reason: unparseable, empty, truncated (cut at max_tokens), length,
    template_marker, duplicate (ROUGE-L with a seed or an earlier example at the threshold or
    above), too_similar / unrelated (a paraphrase against its original)."""
    rejected_samples: dict[str, str] = field(default_factory=dict)
    """The first rejected answer per reason (cut to 300 characters), to see what the model wrote."""
    written: int = 0
    """Records in the output (augment: with the originals, when kept)."""
    findings: list[Finding] = field(default_factory=list)
    """Input records that could not be read or used (with their lines)."""

    @property
    def complete(self) -> bool:
        return self.kept >= self.requested

    def reject(self, reason: str, answer: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1
        self.rejected_samples.setdefault(reason, answer[:300])

    def render(self, limit: int = 50) -> str:
        lines = [f"{self.out}: {self.kept:,} of {self.requested:,} examples kept ({self.method} by {self.generator}, {self.attempts:,} requests)"]
        if self.method == "paraphrase":
            lines[0] += f", {self.written:,} records written with the originals" if self.written > self.kept else ""
        if not self.complete:
            lines.append(f"  fewer than asked for: the attempts ran out (see the rejections below){'' if self.method == 'paraphrase' else '; allow more with max_attempts'}")
        for reason, count in sorted(self.rejected.items(), key=lambda item: -item[1]):
            lines.append(f"  rejected {count:,} x {reason}, e.g. {self.rejected_samples[reason][:120]!r}")
        if self.findings:
            lines += ["Input records not used:", *findings_lines(self.findings, limit)]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {**asdict(self), "out": str(self.out), "complete": self.complete}


def _check_output(out: str | Path, source: Path) -> Path:
    """Fail before spending compute on a run whose output could not be written."""
    out = Path(out)
    if out.suffix.lower() not in WRITABLE:
        raise TunelabError(f"Output '{out}' has the extension '{out.suffix}'; write {', '.join(WRITABLE)}.")
    if out.exists() and out.resolve() == source.resolve():
        raise TunelabError(f"Output '{out}' is the input file; tunelab never edits data in place. Give another output path.")
    if out.is_dir():
        raise TunelabError(f"Output '{out}' is a folder; give a file name ending in {', '.join(WRITABLE)}.")
    return out


def _alpaca_records(path, fmt: str, prompt_field: str, completion_field: str, messages_field: str | None):
    """(record, alpaca row) for every record of the file that reads as ``fmt`` and converts to
    alpaca, and a finding for every one that does not."""
    scanned = scan_file(path)
    cfg = format_config(fmt, prompt_field, completion_field, messages_field)
    check_format_fields(scanned, cfg)
    converted, findings = convert_records(scanned.records, cfg, "alpaca")
    findings = list(scanned.findings) + findings
    if not converted:
        detail = f" ({findings[0].render()})" if findings else ""
        raise TunelabError(f"'{scanned.path}' holds no usable {fmt} records{detail}.")
    return scanned.path, converted, findings


def _where(record: Record) -> int | str:
    return record.line if record.line is not None else record.where


def _example_row(example: dict, provenance: dict) -> dict:
    return {"instruction": example["instruction"], "input": example["input"], "output": example["output"], "provenance": provenance}


# ---------------------------------------------------------------- self-instruct

ASK_FIRST = (
    "Write a new task for an AI assistant and its correct answer, in this layout: a line starting with "
    "'Instruction:', then, only if the task needs extra text to work on, a line starting with 'Input:', "
    "then a line starting with 'Output:' followed by a short answer."
)
ASK_AGAIN = "Write another new task in the same layout, on a different topic, with a short answer."
# Longer seed answers are cut in the prompt: the seeds show the layout, and small models write
# answers as long as the ones they were shown, which then run past max_tokens.
SEED_OUTPUT_CHARS = 300


def _layout(example: dict) -> str:
    output = example["output"]
    if len(output) > SEED_OUTPUT_CHARS:
        cut = output[:SEED_OUTPUT_CHARS]
        output = cut[: max(cut.rfind("\n"), cut.rfind(". ") + 1)] or cut
    lines = [f"Instruction: {example['instruction']}"]
    if example["input"]:
        lines.append(f"Input: {example['input']}")
    lines.append(f"Output: {output.strip()}")
    return "\n".join(lines)


def self_instruct_messages(examples: list[dict]) -> list[dict]:
    """The request: the seed examples as earlier turns of the conversation, each the assistant's
    answer to the same request, then the request once more. Small chat models copy a layout they
    have just "written" far more reliably than one described in words."""
    messages = []
    for i, example in enumerate(examples):
        messages += [{"role": "user", "content": ASK_FIRST if i == 0 else ASK_AGAIN}, {"role": "assistant", "content": _layout(example)}]
    messages.append({"role": "user", "content": ASK_AGAIN if examples else ASK_FIRST})
    return messages


def synthesize(
    seeds_path: str | Path,
    out: str | Path,
    n: int,
    client: Client,
    *,
    seed_format: str = "alpaca",
    examples_per_prompt: int = 3,
    max_attempts: int | None = None,
    max_tokens: int = 256,
    temperature: float = 0.7,
    similarity: float = SIMILARITY,
    limits: Limits | None = None,
    seed: int = 0,
    prompt_field: str = "prompt",
    completion_field: str = "completion",
    messages_field: str | None = None,
    progress: bool = True,
) -> SynthReport:
    """Write ``n`` new instruction examples in the style of the seed file (Self-Instruct).

    Each request shows ``examples_per_prompt`` seeds drawn at random and asks for one new task
    with its answer; each answer is parsed, checked and kept only if its instruction's ROUGE-L F
    with every seed and every kept instruction is below ``similarity``. At most
    ``max_attempts`` requests (default 5 n) are sent; the report says how many examples were
    kept and why the others were rejected. Examples are written in alpaca format with
    ``provenance`` {generator, method, seed_file, seed_lines (line numbers, or the place in a
    file without lines), rouge_l_max}. Nothing is written when no example is kept.
    """
    if n < 1 or examples_per_prompt < 1:
        raise TunelabError(f"n={n} and examples_per_prompt={examples_per_prompt} must be at least 1.")
    if not 0 < similarity <= 1:
        raise TunelabError(f"similarity={similarity} must be in (0, 1]: the ROUGE-L F at which a new instruction counts as a duplicate.")
    path, seeds, findings = _alpaca_records(seeds_path, seed_format, prompt_field, completion_field, messages_field)
    out = _check_output(out, path)
    report = SynthReport(out, client.name, "self-instruct", n, findings=findings)
    known = Similarity(row["instruction"] for _, row in seeds)
    rng = random.Random(seed)
    rows = []
    bar = progress_bar(n, enabled=progress, desc="synthesize")
    try:
        while len(rows) < n and report.attempts < (max_attempts or 5 * n):
            picked = rng.sample(seeds, min(examples_per_prompt, len(seeds)))
            report.attempts += 1
            answer = client.complete(self_instruct_messages([row for _, row in picked]), max_tokens=max_tokens, temperature=temperature)
            report.generated += 1
            example, reason = parse_example(answer)
            reason = reason or _cut_off(client, answer, example["output"]) or check_example(example, limits)
            score = known.best(example["instruction"]) if reason is None else 0.0
            if reason is None and score >= similarity:
                reason = "duplicate"
            if reason:
                report.reject(reason, answer)
                continue
            known.add(example["instruction"])
            provenance = {"generator": client.name, "method": "self-instruct", "seed_file": path.name,
                          "seed_lines": [_where(record) for record, _ in picked], "rouge_l_max": round(score, 4)}  # fmt: skip
            rows.append(_example_row(example, provenance))
            bar.update(1)
            bar.set_postfix(attempts=report.attempts)
    finally:
        bar.close()
    return _finish(report, rows, len(rows), path)


def _cut_off(client: Client, answer: str, text: str) -> str | None:
    """"truncated" when the answer stopped at max_tokens inside ``text`` (the part kept); a cut
    after it (the model went on to write a second task) does no harm."""
    return "truncated" if getattr(client, "truncated", False) and answer.rstrip().endswith(text) else None


def _finish(report: SynthReport, rows: list[dict], new: int, source: Path) -> SynthReport:
    """Write ``rows`` (of which ``new`` were generated), or say why nothing was kept."""
    if not new:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(report.rejected.items())) or "none"
        sample = next(iter(report.rejected_samples.items()), None)
        seen = f" The first rejected answer ({sample[0]}): {sample[1]!r}." if sample else ""
        raise TunelabError(
            f"{report.generator} wrote no usable example in {report.attempts} attempts (rejected: {reasons}), so nothing was written.{seen} "
            "Try a larger model, more attempts, or another temperature."
        )
    report.kept = new
    report.written = len(rows)
    write_records(report.out, rows, inputs=[source])
    return report


# ---------------------------------------------------------------- paraphrase

PARAPHRASE_ASK = "Rewrite this instruction in different words, keeping its meaning. Reply with the rewritten instruction only.\n\n{instruction}"
# One worked example, as an earlier turn: small models otherwise tend to answer the instruction.
PARAPHRASE_EXAMPLE = ("Give three tips for staying healthy.", "What are three things a person can do to stay healthy?")
_PARAPHRASE_LABEL = re.compile(r"^\s*(?:\*\*)?(?:rewritten|new|paraphrased)?\s*(?:instruction|paraphrase|rewrite)\s*(?:\*\*)?\s*:\s*", re.IGNORECASE)


def paraphrase_messages(instruction: str) -> list[dict]:
    question, answer = PARAPHRASE_EXAMPLE
    return [
        {"role": "user", "content": PARAPHRASE_ASK.format(instruction=question)},
        {"role": "assistant", "content": answer},
        {"role": "user", "content": PARAPHRASE_ASK.format(instruction=instruction)},
    ]


def parse_paraphrase(text: str, original: str) -> str:
    """The rewritten instruction: without a leading label or quotes, and cut at the first blank
    line when the original has none (what follows is the model answering it)."""
    text = _PARAPHRASE_LABEL.sub("", text.strip())
    if "\n\n" not in original:
        text = text.split("\n\n")[0]
    text = text.strip()
    if len(text) > 1 and text[0] == text[-1] and text[0] in "\"'“”":
        text = text[1:-1]
    return text.strip("“”").strip()


def augment(
    path: str | Path,
    out: str | Path,
    client: Client,
    *,
    format: str = "alpaca",
    n_per_example: int = 1,
    tries_per_paraphrase: int = 3,
    include_original: bool = True,
    max_tokens: int = 128,
    temperature: float = 0.7,
    similarity: float = SIMILARITY,
    min_similarity: float = 0.1,
    limits: Limits | None = None,
    prompt_field: str = "prompt",
    completion_field: str = "completion",
    messages_field: str | None = None,
    progress: bool = True,
) -> SynthReport:
    """Add ``n_per_example`` paraphrases of each record's instruction, each with the record's
    input and output unchanged.

    A paraphrase is kept when it passes the same checks as a synthesized example, differs from
    its original (ROUGE-L F below ``similarity``: "too_similar" otherwise) without leaving it
    altogether (at least ``min_similarity``: "unrelated" otherwise, usually a model answering
    the instruction instead of rewording it), and is no duplicate of another instruction of the
    file or of a kept paraphrase. Each record gets up to ``tries_per_paraphrase`` requests per
    paraphrase wanted. The output is alpaca: the originals (``include_original``) and then the
    paraphrases, each with ``provenance`` {generator, method: paraphrase, source_file,
    source_line (the line, or the place in a file without lines), rouge_l_original}.
    """
    if n_per_example < 1 or tries_per_paraphrase < 1:
        raise TunelabError(f"n_per_example={n_per_example} and tries_per_paraphrase={tries_per_paraphrase} must be at least 1.")
    source, records, findings = _alpaca_records(path, format, prompt_field, completion_field, messages_field)
    out = _check_output(out, source)
    report = SynthReport(out, client.name, "paraphrase", len(records) * n_per_example, findings=findings)
    known = Similarity(row["instruction"] for _, row in records)
    rules = _ParaphraseRules(similarity, min_similarity, limits)
    ask = {"max_tokens": max_tokens, "temperature": temperature}
    new_rows = []
    bar = progress_bar(len(records), enabled=progress, desc="augment")
    try:
        for record, row in records:
            kept = 0
            for _ in range(n_per_example * tries_per_paraphrase):
                if kept == n_per_example:
                    break
                report.attempts += 1
                answer = client.complete(paraphrase_messages(row["instruction"]), **ask)
                report.generated += 1
                candidate = {**row, "instruction": parse_paraphrase(answer, row["instruction"])}
                reason, closeness = rules.judge(client, answer, row, candidate, known)
                if reason:
                    report.reject(reason, answer)
                    continue
                known.add(candidate["instruction"])
                kept += 1
                provenance = {"generator": client.name, "method": "paraphrase", "source_file": source.name,
                              "source_line": _where(record), "rouge_l_original": round(closeness, 4)}  # fmt: skip
                new_rows.append({**{k: v for k, v in candidate.items() if k != "provenance"}, "provenance": provenance})
            bar.update(1)
    finally:
        bar.close()
    originals = [row for _, row in records] if include_original else []
    return _finish(report, originals + new_rows, len(new_rows), source)


@dataclass
class _ParaphraseRules:
    similarity: float
    min_similarity: float
    limits: Limits | None

    def judge(self, client: Client, answer: str, original: dict, candidate: dict, known: Similarity) -> tuple[str | None, float]:
        """(the reason to reject the paraphrase or None, its ROUGE-L F with the original)."""
        reason = _cut_off(client, answer, candidate["instruction"]) or check_example(candidate, self.limits)
        if reason:
            return reason, 0.0
        closeness = rouge_l(original["instruction"], candidate["instruction"])
        if closeness >= self.similarity:
            return "too_similar", closeness
        if closeness < self.min_similarity:
            return "unrelated", closeness
        if known.best(candidate["instruction"]) >= self.similarity:
            return "duplicate", closeness
        return None, closeness
