"""Llama-family models, and LoRA adapters on them, as GGUF files (llama.cpp, Ollama, LM Studio),
written with the ``gguf`` package's writer.

What llama.cpp needs beyond the weights, and what an export easily gets wrong:

- Query and key projections reordered for llama.cpp's rotary embedding. transformers rotates the
  two halves of each head (``rotate_half``); llama.cpp rotates adjacent pairs. Each head's rows are
  interleaved (``rope_permute``); a file without it loads in both readers and answers nonsense.
  transformers' GGUF loader undoes the permutation, which is how the tests round-trip it.
- The tokenizer: every token with its type (control tokens such as ``<|im_end|>`` kept apart),
  the BPE merges, the special token ids, whether a BOS token is added, the pre-tokenizer's name
  (how text is split before BPE), and the chat template.
- Norms and other 1-D tensors stay float32; a quantized type applies to the 2-D weights whose rows
  fit its blocks (others fall back to float16).
"""

import json
import logging
from pathlib import Path

import numpy as np
import torch

from tunelab.errors import TunelabError

log = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)  # Llama 1/2/3-shaped models: SmolLM, TinyLlama, Llama, ...
NUMBER_FORMATS = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")


def _gguf():
    try:
        import gguf
    except ImportError:  # pragma: no cover - gguf is a dependency
        raise TunelabError("GGUF export needs the gguf package: pip install gguf") from None
    return gguf


def _quant_type(number_format: str):
    gguf = _gguf()
    if number_format not in NUMBER_FORMATS:
        raise TunelabError(f"--type {number_format} is not one tunelab writes; choose one of: {', '.join(NUMBER_FORMATS)}.")
    return getattr(gguf.GGMLQuantizationType, number_format.upper())


def _file_type(number_format: str):
    gguf = _gguf()
    return gguf.LlamaFileType.ALL_F32 if number_format == "f32" else getattr(gguf.LlamaFileType, f"MOSTLY_{number_format.upper()}")


def rope_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """Rows of a query or key projection (heads x head_dim, in transformers' half-split rotary
    order) reordered so that each head's rotary pairs are adjacent, as llama.cpp rotates them."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def check_architecture(config, what: str) -> None:
    architectures = list(getattr(config, "architectures", None) or [])
    known = architectures[0] in SUPPORTED_ARCHITECTURES if architectures else getattr(config, "model_type", None) == "llama"
    if not known:
        found = architectures[0] if architectures else getattr(config, "model_type", "unknown")
        raise TunelabError(
            f"{what} is a {found}; tunelab writes GGUF for {', '.join(SUPPORTED_ARCHITECTURES)} (the Llama family: SmolLM, "
            "TinyLlama, Llama 2 and 3-shaped models). For other architectures use llama.cpp's convert_hf_to_gguf.py."
        )
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise TunelabError(f"{what} has bias terms in its attention or MLP, which tunelab's GGUF writer does not carry.")


def _rope(config) -> tuple[float, dict | None]:
    """(rope theta, rope scaling or None), from transformers 5's ``rope_parameters`` or older fields."""
    parameters = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    theta = parameters.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    kind = parameters.get("rope_type", parameters.get("type", "default"))
    if kind not in ("default", "linear"):
        raise TunelabError(
            f"The model's rotary embedding uses '{kind}' scaling, which tunelab's GGUF writer does not encode yet "
            "(linear scaling and none are supported)."
        )
    return float(theta), (parameters if kind == "linear" else None)


# ----------------------------------------------------------------------------- tokenizer
def pre_tokenizer_name(tokenizer_json: dict) -> str:
    """llama.cpp's name for how the tokenizer splits text before BPE, recognised from the
    tokenizer's own description; 'default' (with a warning) when it is none of the known ones."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and "\\p{N}{1,3}" in json.dumps(steps[0].get("pattern", {})):
        return "llama-bpe"
    log.warning("The tokenizer's pre-tokenizer (%s) is not one tunelab recognises; the GGUF says 'default', and llama.cpp may "
                "split some text differently (the export's tokenizer check reports it).", kinds)  # fmt: skip
    return "default"


def add_tokenizer(writer, tokenizer, vocab_size: int) -> None:
    """The BPE tokenizer as llama.cpp's 'gpt2' tokenizer model."""
    gguf = _gguf()
    description = json.loads(tokenizer.backend_tokenizer.to_str())
    if description["model"]["type"] != "BPE":
        raise TunelabError(
            f"The tokenizer is a {description['model']['type']} tokenizer; tunelab's GGUF writer carries byte-level BPE "
            "tokenizers (GPT-2, Llama 3, SmolLM style). Use llama.cpp's convert_hf_to_gguf.py for SentencePiece ones."
        )
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for token, i in tokenizer.get_vocab().items():
        if i < vocab_size:
            tokens[i], types[i] = token, gguf.TokenType.NORMAL
    for i, added in tokenizer.added_tokens_decoder.items():
        if i < vocab_size:
            tokens[i], types[i] = added.content, gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in description["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(description))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for name, token_id in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id), ("unk", tokenizer.unk_token_id),
                           ("pad", tokenizer.pad_token_id)):  # fmt: skip
        if token_id is not None and token_id < vocab_size:
            getattr(writer, f"add_{name}_token_id" if name != "unk" else "add_unk_token_id")(token_id)
    probe = tokenizer("a")["input_ids"]
    writer.add_add_bos_token(bool(tokenizer.bos_token_id is not None and probe and probe[0] == tokenizer.bos_token_id))
    writer.add_add_eos_token(bool(tokenizer.eos_token_id is not None and len(probe) > 1 and probe[-1] == tokenizer.eos_token_id))
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


# ----------------------------------------------------------------------------- weights
def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise TunelabError(f"'{folder}' holds no .safetensors weights (save the model with safe_serialization=True, as tunelab does).")
    weights = {}
    for file in files:
        weights |= load_file(file)
    return weights


def _encode(data: np.ndarray, number_format: str) -> tuple[np.ndarray, object]:
    """(array, raw dtype or None) as the writer takes it: float32 for 1-D tensors, the asked type
    for 2-D ones whose rows fit its blocks, float16 otherwise."""
    gguf = _gguf()
    if data.ndim == 1 or number_format == "f32":
        return data.astype(np.float32), None
    if number_format == "f16":
        return data.astype(np.float16), None
    kind = _quant_type(number_format)
    block = gguf.GGML_QUANT_SIZES[kind][0]
    if data.shape[-1] % block:
        return data.astype(np.float16), None
    return gguf.quants.quantize(data.astype(np.float32), kind), kind


def write_model_gguf(folder: Path, out: Path, number_format: str = "f16", name: str | None = None) -> dict:
    """A transformers Llama folder (safetensors, config, tokenizer) -> one GGUF file at ``out``.
    Returns what was written (tensor count, per-type counts)."""
    from transformers import AutoConfig, AutoTokenizer

    gguf = _gguf()
    folder = Path(folder)
    config = AutoConfig.from_pretrained(folder)
    check_architecture(config, f"'{folder}'")
    _quant_type(number_format)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    theta, scaling = _rope(config)
    heads, kv_heads = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer = gguf.GGUFWriter(out, "llama")
    writer.add_type("model")
    writer.add_name(name or folder.name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(theta)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if scaling:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(_file_type(number_format))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_tokenizer(writer, tokenizer, config.vocab_size)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    counts: dict[str, int] = {}
    for hf_name, tensor in _weights(folder).items():
        if hf_name == "lm_head.weight" and getattr(config, "tie_word_embeddings", False):
            continue  # tied: llama.cpp uses token_embd as the output head when output.weight is absent
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        target = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise TunelabError(f"'{folder}' holds a tensor '{hf_name}' that a Llama GGUF has no place for; the model is not plain Llama.")
        data = tensor.float().numpy()
        if hf_name.endswith("q_proj.weight"):
            data = rope_permute(data, heads)
        elif hf_name.endswith("k_proj.weight"):
            data = rope_permute(data, kv_heads)
        encoded, raw = _encode(data, number_format)
        writer.add_tensor(target, encoded, raw_dtype=raw)
        kind = raw.name if raw is not None else ("F32" if encoded.dtype == np.float32 else "F16")
        counts[kind] = counts.get(kind, 0) + 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()
    return {"tensors": sum(counts.values()), "tensor_types": counts, "pre_tokenizer": pre_tokenizer_name(json.loads(tokenizer.backend_tokenizer.to_str()))}


def write_adapter_gguf(adapter: Path, base_config, out: Path, number_format: str = "f32") -> dict:
    """A peft LoRA adapter folder -> a GGUF adapter file that llama.cpp applies on top of the base's
    GGUF (``--lora FILE``). The B matrices of query and key projections get the base's permutation
    (permute(B @ A) = permute(B) @ A); the scale goes in ``adapter.lora.alpha`` (llama.cpp
    multiplies by alpha / rank)."""
    from safetensors.torch import load_file

    gguf = _gguf()
    adapter = Path(adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    check_architecture(base_config, "The adapter's base")
    if config.get("peft_type") != "LORA":
        raise TunelabError(f"'{adapter}' is a {config.get('peft_type')} adapter; llama.cpp applies LoRA adapters only (merge other families instead).")
    for option, why in (("use_dora", "DoRA rescales the merged weight"), ("modules_to_save", "it trains whole modules (modules_to_save)")):
        if config.get(option):
            raise TunelabError(f"'{adapter}' cannot be a llama.cpp adapter file: {why}, which llama.cpp's LoRA format cannot express. "
                               "Merge it (tunelab export merge) and export the merged model instead.")  # fmt: skip
    if number_format not in ("f32", "f16", "bf16"):
        raise TunelabError(f"--type {number_format}: adapter files are written as f32, f16 or bf16.")
    rank, alpha = int(config["r"]), float(config["lora_alpha"])
    scaling = alpha / (rank**0.5) if config.get("use_rslora") else alpha / rank
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise TunelabError(f"'{adapter}' uses per-module ranks or alphas (rank_pattern/alpha_pattern); a llama.cpp adapter has one alpha.")
    files = [adapter / "adapter_model.safetensors"]
    if not files[0].is_file():
        raise TunelabError(f"'{adapter}' has no adapter_model.safetensors.")
    weights = load_file(files[0])
    heads = base_config.num_attention_heads
    kv_heads = getattr(base_config, "num_key_value_heads", None) or heads
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, base_config.num_hidden_layers)
    writer = gguf.GGUFWriter(out, "llama")
    writer.add_type("adapter")
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, scaling * rank)
    written = 0
    for key, tensor in sorted(weights.items()):
        if ".lora_A." not in key and ".lora_B." not in key:
            raise TunelabError(f"'{adapter}' holds '{key}', which is not a LoRA A or B matrix; llama.cpp's adapter format has no place for it.")
        side = "a" if ".lora_A." in key else "b"
        module = key.split(".lora_")[0]
        hf_name = module.removeprefix("base_model.model.") + ".weight"
        target = names.get_name(hf_name, try_suffixes=(".weight",))
        if target is None or hf_name in ("lm_head.weight", "model.embed_tokens.weight"):
            raise TunelabError(f"'{adapter}' adapts '{module}'; llama.cpp adapter files carry the attention and MLP projections only.")
        data = tensor.float().numpy()
        if side == "b" and hf_name.endswith("q_proj.weight"):
            data = rope_permute(data, heads)
        elif side == "b" and hf_name.endswith("k_proj.weight"):
            data = rope_permute(data, kv_heads)
        encoded, raw = _encode(data, number_format)
        writer.add_tensor(f"{target}.lora_{side}", encoded, raw_dtype=raw)
        written += 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()
    return {"tensors": written, "rank": rank, "alpha": scaling * rank, "scaling": scaling}


def output_head(gguf_file: Path) -> np.ndarray:
    """The output head of a GGUF model (vocab, hidden) in float32, dequantized; the token
    embeddings when the head is tied."""
    gguf = _gguf()
    reader = gguf.GGUFReader(gguf_file)
    tensors = {t.name: t for t in reader.tensors}
    tensor = tensors.get("output.weight") or tensors.get("token_embd.weight")
    if tensor is None:
        raise TunelabError(f"'{gguf_file}' has neither output.weight nor token_embd.weight.")
    return gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32).reshape(tuple(reversed(tensor.shape.tolist())))
