"""Model pools: where a run's model and tokenizer come from.

A model loads from a local Hugging Face folder, from a GGUF file (dequantized once and cached as
safetensors, since dequantizing takes seconds every time) or from a bare config (random init).
"""

import copy
import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal, Optional

import torch

from tunelab.errors import TunelabError
from tunelab.resources import cache_dir, resolve_path

log = logging.getLogger(__name__)

DTypeName = Literal["float32", "bfloat16", "float16", "auto"]


def _dtype(name: str) -> Any:
    return "auto" if name == "auto" else getattr(torch, name)


def _gguf_cache(gguf: Path, part: str) -> Path:
    stat = gguf.stat()
    key = hashlib.sha1(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_dir("gguf", f"{gguf.stem}-{key}", part)


def _convert_once(target: Path, convert) -> Path:
    """Run ``convert(tmp_dir)`` unless ``target`` exists; publish it with an atomic rename."""
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        convert(tmp)
        os.replace(tmp, target)
    except OSError:
        if not target.exists():  # a concurrent process that won the race is fine
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def gguf_tokenizer_dir(gguf: Path) -> Path:
    from transformers import AutoTokenizer

    def convert(tmp: Path) -> None:
        log.info("Converting the tokenizer of %s (once; cached in %s)", gguf.name, tmp.parent)
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)

    return _convert_once(_gguf_cache(gguf, "tokenizer"), convert)


def gguf_model_dir(gguf: Path) -> Path:
    from transformers import AutoModelForCausalLM

    def convert(tmp: Path) -> None:
        log.info("Dequantizing %s to safetensors (once; cached in %s)", gguf.name, tmp.parent)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The weights are dequantized in memory, but transformers still marks the model as
        # GGUF-quantized and refuses to save it: rebuild a plain model around the same tensors.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        model.generation_config = loaded.generation_config
        model.save_pretrained(tmp, safe_serialization=True)

    return _convert_once(_gguf_cache(gguf, "model"), convert)


Quantization = Literal["nf4", "int8"]


def quantization_config(kind: str):
    """transformers' BitsAndBytesConfig for ``modelpool.quantization`` (nf4: QLoRA's settings,
    computing in bf16 where the device does so natively, else float32)."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise TunelabError(
            f"modelpool.quantization={kind} loads the base through bitsandbytes, which is not installed here: "
            "pip install 'bitsandbytes>=0.45' (its wheels include a CPU build), or set modelpool.quantization=null."
        ) from None
    from transformers import BitsAndBytesConfig

    if kind == "nf4":
        from tunelab.engine.trainer import resolve_precision

        # bf16 compute where the hardware has it; elsewhere (AVX2-only CPUs) bf16 matmuls are
        # emulated: measured about 3x slower than float32 on this project's machine, for no gain in memory.
        compute = torch.bfloat16 if resolve_precision("auto") == "bf16-mixed" else torch.float32
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute)
    return BitsAndBytesConfig(load_in_8bit=True)


def is_quantized(model: torch.nn.Module) -> bool:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return bool(getattr(inner, "is_loaded_in_4bit", False) or getattr(inner, "is_loaded_in_8bit", False))


def full_precision_loader(pool, tokenizer):
    """A function that loads ``pool``'s model unquantised (merging a QLoRA adapter needs it)."""

    def load():
        plain = copy.copy(pool)
        plain.quantization = None
        return plain.load_model(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)

    return load


class CausalLMPool:
    """A causal language model and its tokenizer.

    Args:
        model_path: a Hugging Face model folder, a ``.gguf`` file, or ``pkg://package/file``;
            null to build a randomly initialised model from ``config``.
        tokenizer_path: where the tokenizer comes from (default: ``model_path``).
        config: architecture options for random init (``model_type`` plus its config fields).
        dtype: float32, bfloat16, float16 or auto (as stored).
        attn_implementation: passed to transformers (sdpa, eager, flash_attention_2).
        quantization: nf4 (4-bit NormalFloat with double quantisation, bf16 compute: QLoRA) or
            int8, through bitsandbytes (CUDA, or its CPU build); null: unquantised. A quantised
            base trains adapters only.
    """

    auto_class = "AutoModelForCausalLM"
    config_overrides: dict = {}

    def __init__(
        self,
        model_path: Optional[str] = None,
        tokenizer_path: Optional[str] = None,
        config: Optional[dict] = None,
        dtype: DTypeName = "float32",
        attn_implementation: Optional[str] = "sdpa",
        quantization: Optional[Quantization] = None,
    ):
        if model_path is None and config is None:
            raise TunelabError(
                "modelpool needs modelpool.model_path (a model folder or .gguf file) "
                "or modelpool.config (an architecture for random init)."
            )
        if model_path is None and tokenizer_path is None:
            raise TunelabError("modelpool.config builds a model from scratch: set modelpool.tokenizer_path too.")
        self.model_path = model_path
        self.tokenizer_path = tokenizer_path or model_path
        self.config = dict(config or {})
        self.dtype = dtype
        self.attn_implementation = attn_implementation
        if quantization not in (None, *Quantization.__args__):
            raise TunelabError(f"modelpool.quantization={quantization!r} is not one of: null, {', '.join(Quantization.__args__)}.")
        self.quantization = quantization

    def _hf_dir(self, path: str, what: str, part: str) -> Path:
        resolved = resolve_path(path, what)
        if resolved.is_file():
            if resolved.suffix != ".gguf":
                raise TunelabError(
                    f"{what} '{path}' is a file but not a .gguf file. Give a Hugging Face model "
                    "folder (with config.json) or a GGUF file."
                )
            return gguf_tokenizer_dir(resolved) if part == "tokenizer" else gguf_model_dir(resolved)
        if part == "model" and not (resolved / "config.json").exists():
            raise TunelabError(
                f"{what} '{path}' is a folder without config.json, so it is not a Hugging Face "
                "model folder. Point it at the folder that save_pretrained wrote, or at a .gguf file."
            )
        return resolved

    def load_tokenizer(self):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(self._hf_dir(self.tokenizer_path, "modelpool.tokenizer_path", "tokenizer"))
        if tokenizer.pad_token is None:
            # Padding is masked out of the loss by position, never by token id, so reusing EOS
            # as the pad token cannot hide the end-of-answer token from training.
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer

    def _auto_class(self):
        import transformers

        return getattr(transformers, self.auto_class)

    def load_model(self, vocab_size: Optional[int] = None, pad_token_id: Optional[int] = None):
        """Load (or randomly initialise) the model; ``vocab_size`` sizes a model built from config,
        ``pad_token_id`` is recorded in its config."""
        kwargs = {"dtype": _dtype(self.dtype)}
        config_overrides = dict(self.config_overrides)
        if pad_token_id is not None:
            config_overrides["pad_token_id"] = pad_token_id
        if self.attn_implementation:
            kwargs["attn_implementation"] = self.attn_implementation
        if self.quantization:
            kwargs["quantization_config"] = quantization_config(self.quantization)
            if torch.cuda.is_available():  # quantised weights are placed while loading; they cannot move afterwards
                kwargs["device_map"] = {"": torch.cuda.current_device()}
        if self.model_path is None:
            from transformers import AutoConfig

            options = dict(self.config)
            model_type = options.pop("model_type", "llama")
            if vocab_size is not None:
                options.setdefault("vocab_size", vocab_size)
            config = AutoConfig.for_model(model_type, **options, **config_overrides)
            if not self.quantization:
                return self._auto_class().from_config(config, **kwargs)
            with tempfile.TemporaryDirectory() as folder:  # quantisation happens while loading weights: save, then load
                self._auto_class().from_config(config, dtype=kwargs["dtype"]).save_pretrained(folder)
                return self._auto_class().from_pretrained(folder, **kwargs)
        folder = self._hf_dir(self.model_path, "modelpool.model_path", "model")
        return self._auto_class().from_pretrained(folder, **kwargs, **config_overrides)


class SequenceClassificationModelPool(CausalLMPool):
    """A causal LM body with a one-output score head (a reward model), from the same sources as
    CausalLMPool; starting from a causal LM, the head is freshly initialised."""

    auto_class = "AutoModelForSequenceClassification"
    config_overrides = {"num_labels": 1}
