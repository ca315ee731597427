"""Adapters on a loaded model: every peft family and tunelab's bottleneck adapters through one call.

A method that takes ``peft_config`` hands the node to ``apply_adapter``. The node is a ``_target_``
config: any peft config class (``peft.LoraConfig`` with DoRA, rsLoRA or a PiSSA/OLoRA
initialisation, ``peft.IA3Config``, ``peft.LoHaConfig``, ``peft.LoKrConfig``,
``peft.PromptTuningConfig``, ``peft.PrefixTuningConfig``, ...) or
``tunelab.models.bottleneck.BottleneckConfig``. What differs between families and matters to a
training method is answered here, before any model loads:

- ``changes_sequence(node)``: prompt and prefix tuning add virtual tokens, so a batch cannot be
  packed (one packed row would share one set of virtual tokens) and the output head's positions
  shift (``strip_virtual_positions``).
- ``merge_blocker(node)``: why a family cannot be folded into the base weights (None if it can).
- ``mutates_base(node)``: PiSSA and OLoRA move part of the base weights into the adapter; their
  adapter folders are saved converted to plain LoRA against the original base
  (``save_adapter_folder``), so that ``PeftModel.from_pretrained(original_base, folder)`` computes
  what was trained.
"""

import copy
import logging
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

from tunelab.config import instantiate
from tunelab.errors import TunelabError
from tunelab.models.bottleneck import add_bottleneck_adapters, is_bottleneck_config

log = logging.getLogger(__name__)

MUTATING_INITS = ("pissa", "olora")


def _peft_node(node: dict) -> dict:
    """YAML writes the task type as ``peft.TaskType.CAUSAL_LM``; peft takes the member's name."""
    node = dict(node)
    task = node.get("task_type")
    if isinstance(task, str) and task.startswith("peft.TaskType."):
        node["task_type"] = task.rsplit(".", 1)[1]
    return node


def _target(node) -> str:
    return str(node.get("_target_", "")) if isinstance(node, dict) else type(node).__name__


def changes_sequence(node) -> bool:
    """Prompt learning (prompt, prefix, p-tuning): virtual tokens join every sequence."""
    name = _target(node).rsplit(".", 1)[-1]
    return name in ("PromptTuningConfig", "PrefixTuningConfig", "PromptEncoderConfig", "MultitaskPromptTuningConfig", "CPTConfig")


def mutates_base(node) -> bool:
    """PiSSA / OLoRA initialisations: the base weights change when the adapter is created."""
    init = node.get("init_lora_weights", True) if isinstance(node, dict) else getattr(node, "init_lora_weights", True)
    return isinstance(init, str) and init.lower().startswith(MUTATING_INITS)


def merge_blocker(node) -> str | None:
    """Why this family cannot be merged into the base weights, or None if it can."""
    if is_bottleneck_config(node):
        return "bottleneck adapters add layers with a nonlinearity, which no weight of the base can absorb"
    if changes_sequence(node):
        return f"{_target(node).rsplit('.', 1)[-1]} adds virtual tokens to every sequence instead of changing weights"
    return None


def check_adapter_options(method, peft_config, merge_and_unload: bool) -> None:
    """Before any model loads: a family that cannot merge is refused for merge_and_unload, and a
    family that adds virtual tokens switches off packing and the chunked loss (logged)."""
    if not peft_config:
        return
    blocker = merge_blocker(peft_config)
    if merge_and_unload and blocker:
        raise TunelabError(
            f"method.merge_and_unload=true, but {blocker}, so it cannot be merged into the base weights. "
            "Set method.merge_and_unload=false and ship the adapter folder with its base, or train a mergeable family (LoRA, DoRA, IA3, LoHa, LoKr)."
        )
    if changes_sequence(peft_config):
        for name, why in (("packing", "a packed row would share one set of virtual tokens"), ("chunked_loss", "the virtual tokens shift the output positions")):
            if getattr(method, name, False):
                log.info("method.%s switched off for %s: %s", name, str(peft_config.get("_target_", "")).rsplit(".", 1)[-1], why)
                setattr(method, name, False)


def check_reference_under_adapter(reference: str, peft_config) -> None:
    """PiSSA and OLoRA change the base weights, so switching their adapter off does not give the
    starting model back: the reference must be a copy."""
    if reference == "adapter_disabled" and peft_config and mutates_base(peft_config):
        raise TunelabError(
            f"method.reference=adapter_disabled, but init_lora_weights={peft_config.get('init_lora_weights')} moves part of the base "
            "weights into the adapter, so the base with the adapter switched off is not the starting model. Use method.reference=auto (a frozen copy)."
        )


def check_sequence_classification_family(node, what: str, instead: str) -> None:
    """Prefix tuning cannot adapt a sequence-classification model with these versions."""
    if node and _target(node).endswith("PrefixTuningConfig"):
        raise TunelabError(
            f"Prefix tuning cannot train {what} here: peft passes the prefix to a sequence-classification model as "
            f"past_key_values, which transformers 5 models no longer take (they take cache). {instead}"
        )


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """The distinct last names of the model's linear layers (what ``target_modules`` lists)."""
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) or type(module).__name__ in ("Linear4bit", "Linear8bitLt"):
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def check_target_modules(model: torch.nn.Module, node: dict) -> None:
    """Every ``target_modules`` entry (a list of names) must name a module of this model."""
    targets = node.get("target_modules")
    if not isinstance(targets, (list, tuple)) or not targets:
        return  # None (peft's defaults for the architecture), "all-linear" or a regular expression
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()} | {name for name, _ in model.named_modules()}
    missing = [t for t in targets if t not in present]
    if missing:
        raise TunelabError(
            f"method.peft_config.target_modules names {missing}, which match no module of {type(model).__name__}. "
            f"Its linear modules are: {', '.join(linear_module_names(model))} (or write target_modules: all-linear)."
        )


def apply_adapter(model: torch.nn.Module, node: dict, adapter_name: str = "default", fused_kernels: bool = False, tokenizer=None, task_type: str | None = None) -> torch.nn.Module:
    """Wrap a loaded (and prepared) model in the adapter that ``node`` configures.

    ``task_type`` overrides the node's (a reward model's adapter is SEQ_CLS, which also keeps the
    score head trainable); ``tokenizer`` initialises prompt tuning from text when the node gives
    no tokenizer path."""
    if is_bottleneck_config(node):
        return add_bottleneck_adapters(model, {k: v for k, v in node.items() if k != "_target_"} if isinstance(node, dict) else node)
    from peft import get_peft_model, prepare_model_for_kbit_training

    node = _peft_node(node)
    if task_type is not None:
        node["task_type"] = task_type
    check_target_modules(model, node)
    with _tokenizer_path(node, tokenizer) as node:
        config = instantiate(node)
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, config, adapter_name=adapter_name)
    if mutates_base(node):
        model.tunelab_initial_adapter = {k: v.detach().clone() for k, v in _adapter_weights(model, adapter_name).items()}  # the adapter as initialised, for saving against the original base
    if fused_kernels:
        adapters_follow_autocast(model)
    return model


@contextmanager
def _tokenizer_path(node: dict, tokenizer):
    """Prompt tuning initialised from text loads a tokenizer by path: give it the run's tokenizer."""
    init = str(node.get("prompt_tuning_init", "")).upper()
    if not (init.endswith("TEXT") and not node.get("tokenizer_name_or_path")):
        yield node
        return
    if tokenizer is None:
        raise TunelabError("method.peft_config.prompt_tuning_init=TEXT needs method.peft_config.tokenizer_name_or_path (the tokenizer's folder).")
    source = getattr(tokenizer, "name_or_path", None)
    if source and Path(source).is_dir():
        yield {**node, "tokenizer_name_or_path": source}
        return
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        yield {**node, "tokenizer_name_or_path": folder}


def _adapter_weights(model, adapter_name: str) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model, adapter_name=adapter_name)


def save_adapter_folder(model, folder: Path) -> None:
    """``model.save_pretrained(folder)``; a PiSSA/OLoRA adapter is saved converted to a plain LoRA
    of twice the rank against the original base weights (peft's conversion), with the weights
    the conversion leaves out (a reward model's score head) put back."""
    initial = getattr(model, "tunelab_initial_adapter", None)
    if initial is None:
        model.save_pretrained(folder, safe_serialization=True)
        return
    from safetensors.torch import load_file, save_file

    name = model.active_adapter
    with tempfile.TemporaryDirectory() as scratch, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(PiSSA|OLoRA) changes the base weights")
        start = Path(scratch) / "initial"
        config = copy.deepcopy(model.peft_config[name])
        config.init_lora_weights = True
        start.mkdir()
        config.save_pretrained(start)
        save_file({k: v.contiguous() for k, v in initial.items()}, start / "adapter_model.safetensors")
        model.save_pretrained(folder, safe_serialization=True, path_initial_model_for_weight_conversion=str(start))
    file = Path(folder) / "adapter_model.safetensors"
    converted = load_file(file)
    rest = {k: v.detach().contiguous().clone() for k, v in _adapter_weights(model, name).items() if k not in converted and "lora_" not in k}
    if rest:
        save_file({**converted, **rest}, file, metadata={"format": "pt"})


def load_converted_adapter(model, state: dict[str, torch.Tensor], adapter_name: str) -> dict[str, torch.Tensor]:
    """A folder written by ``save_adapter_folder`` for PiSSA/OLoRA holds [trained | initial]
    factors; the run's own adapter is the first half (for resuming)."""
    if getattr(model, "tunelab_initial_adapter", None) is None:
        return state
    rank = model.peft_config[adapter_name].r
    out = {}
    for key, value in state.items():
        if "lora_A" in key and value.shape[0] == 2 * rank:
            value = value[:rank]
        elif "lora_B" in key and value.shape[1] == 2 * rank:
            value = value[:, :rank]
        out[key] = value
    return out


def adapters_follow_autocast(model: torch.nn.Module) -> int:
    """peft casts each adapter's input to the adapter's dtype (float32) before the adapter runs;
    under autocast the adapter's matmul casts it straight back, so each adapted projection keeps
    one more copy of its input for the backward pass. While autocast is on (checked at every
    forward), skip that cast: the same values, and the adapters share the projection's saved input.
    Returns how many adapter layers this applies to."""
    layers = [m for m in model.modules() if hasattr(m, "cast_input_dtype_enabled")]
    if not layers:
        return 0

    def before(module, args, kwargs):  # the device is read here: Fabric moves the model after this setup
        autocast = torch.is_autocast_enabled(next(module.parameters()).device.type)
        for layer in layers:
            layer.cast_input_dtype_enabled = not autocast

    def after(module, args, kwargs, output):
        for layer in layers:
            layer.cast_input_dtype_enabled = True

    model.register_forward_pre_hook(before, with_kwargs=True)
    model.register_forward_hook(after, with_kwargs=True)
    return len(layers)


def strip_virtual_positions(output: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Per-position outputs (rows, positions, ...) of a model whose adapter prepends virtual
    tokens (prompt tuning) cut back to the input's positions; unchanged otherwise."""
    extra = output.shape[1] - input_ids.shape[1]
    return output[:, extra:] if extra > 0 else output
