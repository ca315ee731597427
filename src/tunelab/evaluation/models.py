"""The model under evaluation: a saved model on this machine, or an OpenAI-compatible endpoint.

``load_eval_model(spec)`` takes what a user types after ``--model``:

- a Hugging Face model folder, a ``.gguf`` file or a ``pkg://`` path (as ``modelpool.model_path``);
- a shipped model pool's name (``smollm2-135m``, ``tiny-llama``, ...);
- a tunelab run folder or one of its checkpoints (a full model, or an adapter that goes back on
  the base the run's ``config.yaml`` names);
- an endpoint, ``http(s)://host:port/v1`` (the served model's name after ``#``, else the first one
  ``/v1/models`` lists).

``--adapter`` puts a peft adapter folder (or a tunelab bottleneck adapter) on the model. Local
models generate through tunelab's own decoding loop (``tunelab.models.sampling``: a reserved
key/value cache, greedy or sampled) and score text with one forward pass per batch.
"""

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tunelab.errors import TunelabError

log = logging.getLogger(__name__)


@dataclass
class Generation:
    text: str
    tokens: int  # completion tokens generated
    ended: bool  # stopped at an end-of-sequence token (False: ran into max_new_tokens)
    looped: bool = False  # stopped by the loop guard (stop_loops): the text ends at the first copy of the repeated span


@dataclass
class GenerationStats:
    seconds: float = 0.0
    tokens: int = 0
    sequences: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def _is_endpoint(spec: str) -> bool:
    return spec.startswith(("http://", "https://"))


def _shipped_pool(name: str):
    """The model pool a shipped config name (``smollm2-135m`` or ``CausalLMPool/smollm2-135m``) builds, else None."""
    from tunelab.config import CONFIG_DIR

    stem = name.split("/")[-1]
    path = Path(CONFIG_DIR) / "modelpool" / "CausalLMPool" / f"{stem}.yaml"
    if "/" in name and not name.startswith("CausalLMPool/"):
        return None
    if not path.is_file():
        return None
    from omegaconf import OmegaConf

    from tunelab.config import instantiate

    return instantiate(OmegaConf.load(path))


def _run_checkpoint(folder: Path) -> Path | None:
    """The final checkpoint of a run folder (its summary.json), or its latest checkpoint."""
    summary = folder / "summary.json"
    if summary.is_file():
        try:
            final = json.loads(summary.read_text()).get("final_checkpoint")
        except json.JSONDecodeError:
            final = None
        if final and Path(final).is_dir():
            return Path(final)
    latest = folder / "checkpoints" / "latest"
    if latest.is_file():
        return folder / "checkpoints" / latest.read_text().strip()
    return None


def _pool_of_checkpoint(checkpoint: Path):
    """The base model pool a tunelab checkpoint was trained from (its config.yaml's modelpool)."""
    from omegaconf import OmegaConf

    from tunelab.config import instantiate

    config = checkpoint / "config.yaml"
    if not config.is_file():
        return None
    pool = OmegaConf.load(config).get("modelpool")
    if pool is None:
        return None
    pool = OmegaConf.to_container(pool, resolve=False)
    pool["quantization"] = None  # evaluation runs the adapter on the full-precision base
    return instantiate(pool)


def _adapter_folder(path: Path) -> bool:
    from tunelab.models.bottleneck import is_bottleneck_folder

    return (path / "adapter_config.json").is_file() or is_bottleneck_folder(path)


def _attach_adapter(model, folder: Path):
    from tunelab.models.bottleneck import is_bottleneck_folder, load_bottleneck_adapters

    if is_bottleneck_folder(folder):
        return load_bottleneck_adapters(model, folder)
    if not (folder / "adapter_config.json").is_file():
        raise TunelabError(
            f"--adapter '{folder}' holds no adapter_config.json (a peft adapter) or tunelab bottleneck adapter. "
            "Point it at the folder that PeftModel.save_pretrained or `tunelab train` wrote."
        )
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, folder)
    except RuntimeError as error:
        mismatches = [line.strip() for line in str(error).splitlines() if "size mismatch" in line]
        if not mismatches:
            raise
        base = getattr(model.config, "_name_or_path", "") or "the base model"
        raise TunelabError(
            f"The adapter '{folder}' does not fit {base}: {len(mismatches)} of its weights have other shapes, e.g. "
            f"{mismatches[0].rstrip('.')}. It was trained on a different base; give the base it was trained from "
            "(its adapter_config.json names it as base_model_name_or_path)."
        ) from None


def load_eval_model(spec: str, adapter: str | None = None, tokenizer: str | None = None, dtype: str = "float32", device: str | None = None, api_key: str | None = None):
    """A ``LocalModel`` or an ``EndpointModel`` for ``spec`` (see the module docstring)."""
    if _is_endpoint(spec):
        if adapter:
            raise TunelabError("--adapter puts an adapter on a local model; an endpoint serves its own. Name the served adapter in --model URL#NAME.")
        return EndpointModel(spec, api_key=api_key, tokenizer=tokenizer)
    from tunelab.models import CausalLMPool

    path = Path(spec).expanduser()
    pool, adapter_path, name = None, Path(adapter).expanduser() if adapter else None, spec
    if path.is_dir() and not (path / "config.json").is_file():
        checkpoint = _run_checkpoint(path) or path
        if (checkpoint / "config.json").is_file():
            path = checkpoint
        elif _adapter_folder(checkpoint):
            pool = _pool_of_checkpoint(checkpoint)
            if pool is None:
                raise TunelabError(
                    f"--model '{spec}' is an adapter without the config.yaml of a tunelab run, so its base is unknown: "
                    f"give the base as --model and the adapter as --adapter {checkpoint}."
                )
            adapter_path = adapter_path or checkpoint
            tokenizer = tokenizer or str(checkpoint)
        elif (checkpoint / "state.ckpt").is_file():
            raise TunelabError(
                f"--model '{spec}' is a tunelab run whose checkpoint {checkpoint} is in Lightning's format (state.ckpt, "
                "method.save_ckpt_type=lightning), which `tunelab train` resumes from but other tools do not load. Train with "
                "method.save_ckpt_type=hf (or peft for an adapter) to get a folder that loads everywhere."
            )
        else:
            raise TunelabError(
                f"--model '{spec}' is a folder, but neither a Hugging Face model folder (config.json), a tunelab run or "
                "checkpoint, nor an adapter. Give a model folder, a .gguf file, a run folder, a shipped model pool "
                "name (smollm2-135m, tiny-llama) or an endpoint URL."
            )
    if pool is None:
        pool = None if (path.exists() or spec.startswith("pkg://")) else _shipped_pool(spec)
        if pool is None:
            if not path.exists() and not spec.startswith("pkg://"):
                raise TunelabError(
                    f"--model '{spec}' does not exist. Give a Hugging Face model folder, a .gguf file, a tunelab run "
                    "folder, a shipped model pool name (smollm2-135m, tiny-llama, small-llama) or an http(s):// endpoint."
                )
            pool = CausalLMPool(model_path=str(path) if not spec.startswith("pkg://") else spec)
    pool.dtype = dtype
    if tokenizer:
        pool.tokenizer_path = tokenizer
    tok = pool.load_tokenizer()
    torch.manual_seed(0)  # a pool built from a bare config (tests) gets the same random weights every time
    model = pool.load_model(vocab_size=len(tok), pad_token_id=tok.pad_token_id)
    if adapter_path is not None:
        model = _attach_adapter(model, adapter_path)
        name = f"{spec} + {adapter_path}" if adapter else spec
    return LocalModel(model.eval(), tok, name, device=device)


def _eos_ids(model, tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    generation = getattr(model, "generation_config", None)
    configured = getattr(generation, "eos_token_id", None)
    ids |= set(configured if isinstance(configured, list) else [configured] if configured is not None else [])
    return sorted(ids)


class LocalModel:
    """A model and tokenizer in this process."""

    def __init__(self, model, tokenizer, name: str, device: str | None = None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device)
        self.tokenizer = tokenizer
        self.name = name
        self.eos_token_ids = _eos_ids(model, tokenizer)

    def render(self, prompt) -> str:
        """A chat prompt (a list of messages) through the chat template, ready for the reply; a
        string stays as it is (raw continuation)."""
        from tunelab.data import render

        return render(self.tokenizer, prompt, add_generation_prompt=True) if isinstance(prompt, list) else prompt

    def generate(
        self, prompts: list, max_new_tokens: int = 256, greedy: bool = True, temperature: float = 1.0, top_p: float = 1.0,
        top_k: int = 0, batch_size: int = 16, seed: int = 0, stats: GenerationStats | None = None, progress=None,
        stop_loops: bool = False,
    ) -> list[Generation]:
        """Complete every prompt. Prompts are batched by length (less padding); results come back
        in order. ``stop_loops``: a completion that cycles (``LoopGuard``: one span over and over,
        numbers aside) is stopped and cut after the span's first copy (``Generation.looped``)."""
        from tunelab.models.sampling import LoopGuard, sample

        tok = self.tokenizer
        encoded = [tok(self.render(p), add_special_tokens=not isinstance(p, list))["input_ids"] for p in prompts]
        order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
        results: list[Generation | None] = [None] * len(prompts)
        stops = set(self.eos_token_ids) | ({tok.pad_token_id} if stop_loops else set())  # a stopped loop is padded like an ended row
        guard = LoopGuard(tok) if stop_loops else None
        generator = torch.Generator(device=self.device).manual_seed(seed)
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            width = max(len(encoded[i]) for i in rows)
            ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, i in enumerate(rows):  # left padding: every prompt ends where generation starts
                ids[r, width - len(encoded[i]) :] = torch.tensor(encoded[i])
                mask[r, width - len(encoded[i]) :] = 1
            began = time.perf_counter()
            out = sample(
                self.model, ids.to(self.device), mask.to(self.device), max_new_tokens, self.eos_token_ids, tok.pad_token_id,
                temperature=temperature, top_p=top_p, top_k=top_k, greedy=greedy, generator=generator, loop_guard=guard,
            ).cpu()
            for r, i in enumerate(rows):
                row = out[r].tolist()
                ends = [k for k, t in enumerate(row) if t in stops]
                cut = ends[0] if ends else len(row)
                loop = guard.start(row[:cut]) if guard is not None else None
                if loop is not None:  # stopped by the guard (the padding after it may read as an end of sequence)
                    text, length, ended = tok.decode(row[:loop], skip_special_tokens=True), cut, False
                else:
                    text, length, ended = tok.decode(row[:cut], skip_special_tokens=True), cut + 1 if ends else cut, bool(ends)
                results[i] = Generation(text.strip(), length, ended, looped=loop is not None)
                if stats is not None:
                    stats.tokens += length
            if stats is not None:
                stats.seconds += time.perf_counter() - began
                stats.sequences += len(rows)
            if progress is not None:
                progress.update(len(rows))
        return results

    @torch.no_grad()
    def token_losses(self, rows: list[tuple[list[int], list[int]]]) -> list[tuple[float, int]]:
        """(summed negative log-likelihood, scored tokens) of each (input_ids, labels) row, labels
        as in training (-100: not scored; each label is predicted from the tokens before it)."""
        from tunelab.data import IGNORE_INDEX

        width = max(len(ids) for ids, _ in rows)
        ids = torch.full((len(rows), width), self.tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, (row_ids, row_labels) in enumerate(rows):
            ids[r, : len(row_ids)], labels[r, : len(row_labels)], mask[r, : len(row_ids)] = torch.tensor(row_ids), torch.tensor(row_labels), 1
        logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits.float()
        targets = labels[:, 1:].to(self.device)
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none")
        scored = targets != IGNORE_INDEX
        return [(float(n), int(c)) for n, c in zip((nll * scored).sum(1).tolist(), scored.sum(1).tolist())]

    @property
    def max_length(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 2048) or 2048)


class EndpointModel:
    """An OpenAI-compatible server (``/v1/chat/completions``, ``/v1/completions``) through the
    official ``openai`` client. Chat prompts go to chat completions, text prompts to completions."""

    def __init__(self, url: str, api_key: str | None = None, tokenizer: str | None = None):
        try:
            import openai
        except ImportError:
            raise TunelabError("Evaluating an endpoint uses the openai client: pip install 'openai>=1.0'.") from None
        import os

        base, _, served = url.partition("#")
        self.client = openai.OpenAI(base_url=base.rstrip("/"), api_key=api_key or os.environ.get("OPENAI_API_KEY") or "not-needed", max_retries=1)
        try:
            self.served = served or self.client.models.list().data[0].id
        except openai.APIConnectionError:
            raise TunelabError(f"--model {base}: no OpenAI-compatible server answers there. Start it, or check the host, port and /v1 suffix.") from None
        except (openai.APIError, IndexError) as err:
            raise TunelabError(f"--model {base}: /v1/models did not list a model ({err}); name it as {base}#MODEL.") from None
        self.name = f"{base}#{self.served}"
        self.tokenizer = None
        self.tokenizer_path = tokenizer

    def generate(self, prompts: list, max_new_tokens: int = 256, greedy: bool = True, temperature: float = 1.0, top_p: float = 1.0,
                 top_k: int = 0, batch_size: int = 16, seed: int = 0, stats: GenerationStats | None = None, progress=None) -> list[Generation]:  # fmt: skip
        import openai

        results = []
        for i, prompt in enumerate(prompts):
            options = {"model": self.served, "max_tokens": max_new_tokens, "temperature": 0.0 if greedy else temperature, "top_p": top_p, "seed": seed + i}
            began = time.perf_counter()
            try:
                if isinstance(prompt, list):
                    reply = self.client.chat.completions.create(messages=prompt, **options)
                    text = reply.choices[0].message.content or ""
                else:
                    reply = self.client.completions.create(prompt=prompt, **options)
                    text = reply.choices[0].text
            except openai.APIError as err:
                raise TunelabError(f"The endpoint {self.name} failed on prompt {i}: {err}") from None
            tokens = reply.usage.completion_tokens if reply.usage else 0
            results.append(Generation(text.strip(), tokens, reply.choices[0].finish_reason == "stop"))
            if stats is not None:
                stats.seconds += time.perf_counter() - began
                stats.tokens += tokens
                stats.sequences += 1
            if progress is not None:
                progress.update(1)
        return results

    def text_logprobs(self, text: str) -> tuple[list[float], list[int]]:
        """Each token's log-probability (the first has none) and its character offset, through
        /v1/completions with echo and logprobs."""
        import openai

        try:
            reply = self.client.completions.create(model=self.served, prompt=text, max_tokens=0, echo=True, logprobs=0)
        except openai.APIError as err:
            raise TunelabError(f"The endpoint {self.name} cannot score text ({err}): perplexity needs /v1/completions with echo and logprobs.") from None
        logprobs = reply.choices[0].logprobs
        if logprobs is None or not logprobs.token_logprobs:
            raise TunelabError(f"The endpoint {self.name} returned no logprobs for echoed text: perplexity needs /v1/completions with echo and logprobs.")
        return logprobs.token_logprobs, logprobs.text_offset
