"""Sampling completions from a causal LM: tunelab's decoding loop.

transformers' ``generate`` is the reference, and the online methods can still use it
(``method.fast_generation=false``). Decoding a small batch is bound by reading the weights once per
token, and on a CPU ``generate`` spends about a third more than that read, in three places this
loop avoids:

- the output head as ``x @ W.T``: for a few rows against a 49k x 576 head, MKL's skinny GEMM reads
  the head at about a third of the memory bandwidth, and ``W @ x.T`` reads it at full speed (on CPU
  only: a GPU's GEMM does not care);
- the key/value cache grown by concatenation: every token copies the whole cache of every layer,
  while here it is written into buffers reserved for the whole completion;
- multinomial sampling, which draws an exponential variate for every vocabulary entry of every
  row: here one uniform per row picks the token from the cumulative distribution.

It also runs a prompt's forward pass once when the prompt is completed several times
(``repeats``), and stops as soon as every row has ended. The sampled distribution is the one
``generate`` samples with the same temperature, top-k and top-p (greedy decoding gives the same
tokens, and the tests compare both).
"""

import inspect
import logging
from contextlib import contextmanager, nullcontext

import torch

log = logging.getLogger(__name__)

try:  # transformers >= 4.56: caches are lists of layers
    from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
except ImportError:  # pragma: no cover - older transformers: its own DynamicCache, concatenating
    from transformers.cache_utils import DynamicCache

    Cache = DynamicLayer = None

# Model types whose causal-LM forward is exactly ``lm_head(decoder(...))``: no logit scaling or
# soft-capping after the head, so the loop may apply the head itself. Others get the model's own
# forward (with ``logits_to_keep=1``).
PLAIN_HEAD_MODEL_TYPES = {"llama", "mistral", "qwen2", "qwen3", "phi3", "smollm3", "olmo", "olmo2"}


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """``logits`` with the entries outside the top ``top_k`` and outside the smallest set whose
    probability reaches ``top_p`` set to -inf (the most likely token always stays), as
    transformers' TopK and TopP warpers do, top-k first."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        ordered, order = torch.sort(logits, dim=-1)  # ascending
        cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= 1 - top_p
        drop[..., -1] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One index per row of ``probs`` (rows of non-negative weights), drawn with those weights from
    one uniform number per row through the cumulative sums. Entries of weight 0 are never drawn."""
    cumulative = probs.cumsum(dim=-1)
    total = cumulative[..., -1:]
    u = torch.rand(probs.shape[:-1] + (1,), generator=generator, device=probs.device, dtype=cumulative.dtype)
    index = torch.searchsorted(cumulative, u * total, right=True)
    # u * total can round up to the total: take the last entry of positive weight then.
    last = probs.shape[-1] - 1 - (probs > 0).flip(-1).int().argmax(dim=-1, keepdim=True)
    return torch.minimum(index, last).squeeze(-1)


if DynamicLayer is not None:

    class ReservedLayer(DynamicLayer):
        """A cache layer whose keys and values live in buffers reserved for the whole sequence:
        a new token is written in place instead of concatenated to a copy of the cache."""

        def __init__(self, capacity: int):
            super().__init__()
            self.capacity, self.length = capacity, 0

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
                batch, heads, _, _ = key_states.shape
                self.key_buffer = key_states.new_empty(batch, heads, self.capacity, key_states.shape[-1])
                self.value_buffer = value_states.new_empty(batch, heads, self.capacity, value_states.shape[-1])
            end = self.length + key_states.shape[-2]
            if end > self.capacity:
                raise RuntimeError(f"the reserved cache holds {self.capacity} positions and position {end} was written")
            self.key_buffer[:, :, self.length : end] = key_states
            self.value_buffer[:, :, self.length : end] = value_states
            self.length = end
            self.keys, self.values = self.key_buffer[:, :, :end], self.value_buffer[:, :, :end]
            return self.keys, self.values

        def regroup(self, keep: torch.Tensor, start: int, joining: "ReservedLayer | None", length: int, capacity: int) -> None:
            """Hold the rows ``keep`` of this layer from position ``start`` on, then the rows of
            ``joining``, each block right-aligned at ``length`` positions (zeros on the left, which
            the attention mask hides), in new buffers of ``capacity`` positions: a server's running
            batch as requests leave and join it. Keys are stored after each row's own rotary
            embedding, so moving them moves nothing they mean."""
            parts = [(self.key_buffer[keep, :, start : self.length], self.value_buffer[keep, :, start : self.length])] if len(keep) else []
            if joining is not None:
                parts.append((joining.keys, joining.values))
            rows = sum(k.shape[0] for k, _ in parts)
            reference = parts[0][0]
            self.key_buffer = reference.new_empty(rows, reference.shape[1], capacity, reference.shape[-1])
            self.value_buffer = torch.empty_like(self.key_buffer)
            row = 0
            for keys, values in parts:
                end, pad = row + keys.shape[0], length - keys.shape[-2]
                self.key_buffer[row:end, :, pad:length] = keys
                self.value_buffer[row:end, :, pad:length] = values
                self.key_buffer[row:end, :, :pad] = 0  # (masked, but never garbage: no NaN can reach a softmax)
                self.value_buffer[row:end, :, :pad] = 0
                row = end
            self.capacity, self.length, self.device, self.is_initialized = capacity, length, reference.device, True
            self.keys, self.values = self.key_buffer[:, :, :length], self.value_buffer[:, :, :length]

        def batch_repeat_interleave(self, repeats: int) -> None:
            if self.length:
                self.key_buffer = self.key_buffer.repeat_interleave(repeats, dim=0)
                self.value_buffer = self.value_buffer.repeat_interleave(repeats, dim=0)
                self.keys, self.values = self.key_buffer[:, :, : self.length], self.value_buffer[:, :, : self.length]


def reserved_cache(config, capacity: int):
    """A cache for ``capacity`` positions that never copies itself as it grows, for decoders whose
    layers all attend to the whole sequence; transformers' DynamicCache otherwise."""
    config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    layer_types = getattr(config, "layer_types", None)
    full = all(t == "full_attention" for t in layer_types) if layer_types else not getattr(config, "sliding_window", None)
    if Cache is None or not full:
        return DynamicCache(config=config) if Cache is not None else DynamicCache()
    return Cache(layers=[ReservedLayer(capacity) for _ in range(config.num_hidden_layers)])


class _Decoder:
    """One model's next-token logits: through its decoder and output head when the head is plain,
    else through its own forward."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        config = model.config
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        plain = (
            getattr(config, "model_type", None) in PLAIN_HEAD_MODEL_TYPES and type(head) is torch.nn.Linear and head.bias is None
            and hasattr(model, "get_decoder") and not getattr(config, "final_logit_softcapping", None)
        )  # fmt: skip
        self.decoder = model.get_decoder() if plain else None
        self.head = head.weight if plain else None
        # transformers 5.x renames the forward's cache argument (``past_key_values`` -> ``cache``)
        forward = inspect.signature((self.decoder or _unwrap(model)).forward).parameters
        self.cache_argument = "cache" if "cache" in forward else "past_key_values"

    def __call__(self, input_ids, attention_mask, position_ids, cache) -> torch.Tensor:
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids, self.cache_argument: cache, "use_cache": True}
        if self.decoder is None:
            return self.model(**kwargs, logits_to_keep=1).logits[:, -1]
        hidden = self.decoder(**kwargs).last_hidden_state[:, -1]
        if hidden.device.type == "cpu":  # (autocast casts both sides of a matmul)
            return (self.head @ hidden.T).T  # a full-speed read of the head on CPU (see the module docstring)
        return hidden @ self.head.T


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a peft wrapper (whose own forward takes ``**kwargs``)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    eos_token_id: int | list[int] | None,
    pad_token_id: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    greedy: bool = False,
    repeats: int = 1,
    generator: torch.Generator | None = None,
    loop_guard: "LoopGuard | None" = None,
    row_limits: torch.Tensor | None = None,
    on_step=None,
) -> torch.Tensor:
    """Complete each left-padded prompt of ``input_ids`` ``repeats`` times (consecutive rows)
    with up to ``max_new_tokens`` tokens, greedily or by sampling at ``temperature`` after top-k
    and top-p filtering. Returns the new tokens, (prompts x repeats, at most max_new_tokens),
    with ``pad_token_id`` after a row's end of sequence; the loop stops when every row has ended.
    ``loop_guard``: a row also ends once its tail loops (``LoopGuard``; checked every
    ``loop_guard.check_every`` tokens). ``row_limits``: each row's own token limit (at most
    ``max_new_tokens``). ``on_step(tokens)``: called with each step's new token of every row (a
    server streams them).
    The model runs as it is (the caller sets eval mode and autocast)."""
    decoder = _Decoder(model)
    prompt_length = input_ids.shape[1]
    attention_mask = attention_mask.to(torch.long)
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    cache = reserved_cache(model.config, prompt_length + max_new_tokens)
    logits = decoder(input_ids, attention_mask, positions, cache)
    if repeats > 1:  # the prompt's forward once, its cache shared by its completions
        cache.batch_repeat_interleave(repeats)
        logits, attention_mask, positions = (t.repeat_interleave(repeats, dim=0) for t in (logits, attention_mask, positions))
    rows = logits.shape[0]
    ends = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or []), device=logits.device, dtype=torch.long)
    mask = torch.cat([attention_mask, attention_mask.new_zeros(rows, max_new_tokens)], dim=1)
    position = positions[:, -1:]
    done = torch.zeros(rows, dtype=torch.bool, device=logits.device)
    tokens = []
    for t in range(max_new_tokens):
        if greedy:
            token = logits.argmax(dim=-1)
        else:
            scores = filter_logits(logits.float() / temperature, top_k, top_p)
            token = draw(torch.softmax(scores, dim=-1), generator)
        token = torch.where(done, torch.full_like(token, pad_token_id), token)
        tokens.append(token)
        if on_step is not None:
            on_step(token)
        done = done | torch.isin(token, ends)
        if row_limits is not None:
            done = done | (row_limits <= t + 1)
        if loop_guard is not None and (t + 1) % loop_guard.check_every == 0:
            done = done | loop_guard.looping(torch.stack(tokens, dim=1), done)
        if t + 1 == max_new_tokens or bool(done.all()):
            break
        mask[:, prompt_length + t] = 1
        position = position + 1
        logits = decoder(token[:, None], mask[:, : prompt_length + t + 1], position, cache)
    return torch.stack(tokens, dim=1)


class LoopGuard:
    """Knows a degenerate loop in a completion: its tail is one span of at most ``max_period``
    symbols repeated at least ``min_repeats`` times and over at least ``min_symbols`` symbols,
    where a symbol is a token, except that a run of digit tokens reads as one symbol. So
    "= 150 / 2 = 150 / 2 = ..." loops, and so does a line that comes back with new numbers
    ("After the 13th turn, it travels 34 meters. After the 14th turn, ..."), while "1,000,000" or
    one repeated line does not. Greedy decoding of a small model can run either way until the
    token limit. ``tokenizer`` tells which tokens are digits (none: no token is)."""

    def __init__(self, tokenizer=None, min_symbols: int = 32, min_repeats: int = 4, max_period: int = 64, check_every: int = 8):
        self.min_symbols, self.min_repeats, self.max_period, self.check_every = min_symbols, min_repeats, max_period, check_every
        self.digits: set[int] = set()
        if tokenizer is not None:
            pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
            stripped = [(piece or "").strip("Ġ▁ ") for piece in pieces]  # byte-level and sentencepiece space marks
            self.digits = {i for i, piece in enumerate(stripped) if piece.isascii() and piece.isdigit()}

    def symbols(self, tokens: list[int]) -> tuple[list[int], list[int]]:
        """The completion as symbols (a run of digits: -1), and where each symbol starts in ``tokens``."""
        symbols, starts = [], []
        for k, token in enumerate(tokens):
            digit = token in self.digits
            if digit and symbols and symbols[-1] == -1:
                continue
            symbols.append(-1 if digit else token)
            starts.append(k)
        return symbols, starts

    def start(self, tokens: list[int]) -> int | None:
        """Where the repetition begins in ``tokens`` when its tail loops (the first copy of the
        repeated span is kept: it ends there); None when it does not loop."""
        symbols, starts = self.symbols(tokens)
        for period in range(1, self.max_period + 1):
            span = max(self.min_repeats * period, self.min_symbols)
            if span > len(symbols):
                break
            tail = symbols[len(symbols) - span :]
            if tail[period:] == tail[:-period]:
                first = len(symbols) - span
                while first > 0 and symbols[first - 1] == symbols[first - 1 + period]:
                    first -= 1
                return starts[first + period]
        return None

    def looping(self, tokens: torch.Tensor, done: torch.Tensor) -> torch.Tensor:
        """Which rows of ``tokens`` (rows x generated so far) loop, among those not ``done``."""
        rows = [i for i, finished in enumerate(done.tolist()) if not finished]
        flags = torch.zeros_like(done)
        if rows:
            table = tokens[rows].tolist()
            for i, row in zip(rows, table):
                flags[i] = self.start(row) is not None
        return flags


@contextmanager
def generating(model: torch.nn.Module):
    """Yield the model under Fabric's wrapper (if any) ready to decode with the current weights:
    eval mode, no gradients, the run's autocast (as in its forward), and eager execution (compiled
    layers would compile again for every decode shape). Training mode is restored afterwards."""
    inner = getattr(model, "module", model)
    strategy = model.__dict__.get("_strategy")  # Fabric's wrapper: its precision's autocast
    autocast = strategy.precision.forward_context() if strategy is not None else nullcontext()
    set_stance = getattr(torch.compiler, "set_stance", None)
    eager = set_stance("force_eager") if set_stance is not None else nullcontext()
    was_training = inner.training
    inner.eval()
    try:
        with torch.no_grad(), autocast, eager:
            yield inner
    finally:
        inner.train(was_training)
