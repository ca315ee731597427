"""Bottleneck (Houlsby) adapters, the adapter family peft lacks.

A bottleneck adapter is a small two-layer network, ``y -> y + up(act(down(y)))``, that projects a
hidden state down to ``size`` features and back up. One sits on the output of the self-attention
block and one on the output of the MLP block of each decoder layer, before the layer adds its
residual (Houlsby et al., 2019). The base weights stay frozen; only the adapters (and a reward
model's score head) train. Because of the nonlinearity an adapter cannot be folded into the base
weights: a trained model is shipped as its base plus an adapter folder (``save_pretrained``), read
back with ``load_bottleneck_adapters``.

The adapters are child modules of the blocks they follow (``layer.self_attn.bottleneck_adapter``)
and run from forward hooks on those blocks, so the base model's own forward, generate and any
path through its decoder (the chunked loss, gradient checkpointing) all apply them.
"""

import itertools
import json
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from tunelab.errors import TunelabError

CONFIG_NAME = "bottleneck_config.json"
WEIGHTS_NAME = "bottleneck_adapter.safetensors"
FORMAT, VERSION = "tunelab-bottleneck", 1
ADAPTER = "bottleneck_adapter"  # the child module's name on each adapted block
BLOCKS = {"attention": "self_attn", "mlp": "mlp"}  # placement -> the decoder layer's submodule
ACTIVATIONS = {"relu": torch.nn.ReLU, "gelu": torch.nn.GELU, "silu": torch.nn.SiLU, "tanh": torch.nn.Tanh}
FIELD = "method.peft_config"  # where the config lives in a run's YAML, for error messages


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class BottleneckConfig:
    """Where bottleneck adapters go and how they are shaped."""

    size: int = 64
    """Bottleneck width: features between the down- and the up-projection."""
    placement: list[str] = field(default_factory=lambda: ["attention", "mlp"])
    """After the self-attention block and/or the MLP block of every adapted decoder layer."""
    activation: str = "gelu"
    """relu | gelu | silu | tanh."""
    init_std: float = 1e-3
    """Std of the up-projection's normal initialisation; 0 starts every adapter as the identity."""
    dropout: float = 0.0
    """Dropout on the adapter's input (training only)."""
    layers: list[int] | None = None
    """Decoder layer indices to adapt; None adapts every layer."""

    def __post_init__(self) -> None:
        if not _integer(self.size) or self.size < 1:
            raise TunelabError(f"{FIELD}.size={self.size!r} must be at least 1 (an integer: the bottleneck width).")
        placement = [self.placement] if isinstance(self.placement, str) else list(self.placement or [])
        if not placement or any(p not in BLOCKS for p in placement):
            raise TunelabError(f"{FIELD}.placement={placement!r} must be a non-empty list of: {', '.join(BLOCKS)}.")
        self.placement = list(dict.fromkeys(placement))
        if self.activation not in ACTIVATIONS:
            raise TunelabError(f"{FIELD}.activation={self.activation!r} is not one of: {', '.join(ACTIVATIONS)}.")
        if not isinstance(self.init_std, (int, float)) or isinstance(self.init_std, bool) or self.init_std < 0:
            raise TunelabError(f"{FIELD}.init_std={self.init_std!r} must be a number >= 0 (0 starts every adapter as the identity).")
        if not isinstance(self.dropout, (int, float)) or isinstance(self.dropout, bool) or not 0 <= self.dropout < 1:
            raise TunelabError(f"{FIELD}.dropout={self.dropout!r} must be a number with 0 <= dropout < 1.")
        if self.layers is not None:
            layers = list(self.layers)
            if not layers or not all(_integer(i) and i >= 0 for i in layers):
                raise TunelabError(f"{FIELD}.layers={layers!r} must be null (every layer) or a non-empty list of decoder layer indices (0, 1, ...).")
            self.layers = sorted(set(layers))

    def to_dict(self) -> dict:
        """The fields as plain JSON values."""
        return asdict(self)


def _as_config(config) -> BottleneckConfig:
    if isinstance(config, BottleneckConfig):
        return config
    node = {k: v for k, v in dict(config).items() if k != "_target_"}
    known = {f.name for f in fields(BottleneckConfig)}
    unknown = sorted(set(node) - known)
    if unknown:
        raise TunelabError(f"{FIELD} has no field {', '.join(unknown)}; BottleneckConfig's fields are: {', '.join(sorted(known))}.")
    return BottleneckConfig(**node)


def is_bottleneck_config(node) -> bool:
    """A BottleneckConfig, or a ``_target_`` node that builds one."""
    if isinstance(node, BottleneckConfig):
        return True
    target = node.get("_target_") if hasattr(node, "get") else None
    return isinstance(target, str) and target.rsplit(".", 1)[-1] == "BottleneckConfig"


class BottleneckAdapter(torch.nn.Module):
    """``y + up(act(down(dropout(y))))``; ``enabled`` False makes the hook skip it."""

    def __init__(self, hidden: int, config: BottleneckConfig, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.dropout = torch.nn.Dropout(config.dropout)
        self.down = torch.nn.Linear(hidden, config.size, dtype=dtype, device=device)
        self.act = ACTIVATIONS[config.activation]()
        self.up = torch.nn.Linear(config.size, hidden, dtype=dtype, device=device)
        if config.init_std:
            torch.nn.init.normal_(self.up.weight, std=config.init_std)
        else:
            torch.nn.init.zeros_(self.up.weight)
        # Zero biases: the adapter's first change scales with its input instead of adding one
        # random offset to every position (which swamps the small hidden states of some models).
        torch.nn.init.zeros_(self.down.bias)
        torch.nn.init.zeros_(self.up.bias)
        self.enabled = True

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        # Under autocast the linears pick the compute dtype; outside it, a block whose output
        # dtype is not the adapter's (a quantized block computing in float32) is cast to it.
        x = y if torch.is_autocast_enabled(y.device.type) else y.to(self.down.weight.dtype)
        return y + self.up(self.act(self.down(self.dropout(x)))).to(y.dtype)


def _apply_adapter(module: torch.nn.Module, args, output):
    """Forward hook on an adapted block: the adapter on its output (the first element of a tuple)."""
    adapter = getattr(module, ADAPTER)
    if not adapter.enabled:
        return None
    if isinstance(output, tuple):
        return (adapter(output[0]), *output[1:])
    return adapter(output)


def _weight_dtype_device(module: torch.nn.Module, fallback: torch.nn.Module) -> tuple[torch.dtype, torch.device]:
    """The block's floating-point weights' dtype and device (quantized blocks: the model's)."""
    for p in itertools.chain(module.parameters(), fallback.parameters()):
        if p.is_floating_point():
            return p.dtype, p.device
    return torch.float32, torch.device("cpu")


class BottleneckAdapterModel(torch.nn.Module):
    """The base transformers model with bottleneck adapters added in place (base frozen)."""

    def __init__(self, base_model: torch.nn.Module, bottleneck_config: BottleneckConfig, trainable_heads: list[str]):
        super().__init__()
        self.base_model = base_model
        self.bottleneck_config = bottleneck_config
        self.trainable_heads = trainable_heads  # head attributes saved with the adapters (a reward model's score)

    @property
    def config(self):
        return self.base_model.config

    def get_base_model(self) -> torch.nn.Module:
        """The wrapped transformers model (its blocks still carry the adapters)."""
        return self.base_model

    def forward(self, *args, **kwargs):
        return self.base_model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        """The base model's generate (the adapters run inside its forward)."""
        return self.base_model.generate(*args, **kwargs)

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.base_model.get_input_embeddings()

    def get_output_embeddings(self) -> torch.nn.Module | None:
        return self.base_model.get_output_embeddings()

    @property
    def get_decoder(self):
        """The base's get_decoder, so ``hasattr(model, "get_decoder")`` answers as the base does."""
        return self.base_model.get_decoder

    def gradient_checkpointing_enable(self, **kwargs):
        """The base's gradient checkpointing (the adapters are recomputed with their blocks)."""
        return self.base_model.gradient_checkpointing_enable(**kwargs)

    @property
    def activation_checkpointing_enable(self):
        """transformers >= 5 names gradient checkpointing this (and deprecates the old name)."""
        return self.base_model.activation_checkpointing_enable

    def adapters(self) -> list[BottleneckAdapter]:
        return [m for m in self.base_model.modules() if isinstance(m, BottleneckAdapter)]

    @contextmanager
    def disable_adapter(self):
        """Inside the block the adapters are skipped: exactly the base model's outputs."""
        adapters = self.adapters()
        before = [a.enabled for a in adapters]
        for a in adapters:
            a.enabled = False
        try:
            yield
        finally:
            for a, enabled in zip(adapters, before):
                a.enabled = enabled

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter weights and any trainable head, under this module's state_dict names."""
        heads = tuple(f"base_model.{name}." for name in self.trainable_heads)
        return {k: v for k, v in self.state_dict().items() if f".{ADAPTER}." in k or k.startswith(heads)}

    def save_pretrained(self, folder, **kwargs) -> None:
        """Write bottleneck_config.json and bottleneck_adapter.safetensors (adapter weights and
        trainable heads only), each atomically. Always safetensors: ``safe_serialization`` and
        other transformers options are accepted and ignored."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.adapter_state_dict().items()}
        meta = {
            "format": FORMAT, "version": VERSION, **self.bottleneck_config.to_dict(), "trainable_heads": list(self.trainable_heads),
            "base_model_class": type(self.base_model).__name__, "base_model_name_or_path": getattr(self.config, "_name_or_path", None) or None,
        }  # fmt: skip
        # The weights first: a folder whose config is present is complete.
        _write_atomically(folder / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
        _write_atomically(folder / CONFIG_NAME, lambda tmp: tmp.write_text(json.dumps(meta, indent=2) + "\n"))

    def merge_and_unload(self, *args, **kwargs):
        """Refused: a bottleneck adapter cannot be folded into the base weights."""
        raise TunelabError(
            "Bottleneck adapters add layers with a nonlinearity, so they cannot be merged into the base weights. "
            "Ship the adapter folder (save_pretrained) with its base model and load it with "
            "tunelab.models.bottleneck.load_bottleneck_adapters, or train a mergeable family such as LoRA."
        )


def _write_atomically(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _decoder_layers(model: torch.nn.Module, placement: list[str]) -> list[torch.nn.Module]:
    layers = getattr(getattr(model, "base_model", model), "layers", None)
    wanted = [BLOCKS[p] for p in placement]
    found = isinstance(layers, torch.nn.ModuleList) and all(isinstance(getattr(layer, name, None), torch.nn.Module) for layer in layers for name in wanted)
    if not found:
        raise TunelabError(
            f"Bottleneck adapters need decoder layers, which {type(model).__name__} does not have where they are looked for: "
            f"model.base_model.layers (a ModuleList), each layer with the submodule(s) {', '.join(wanted)} (for placement {placement}). "
            "Use a Llama-style transformers model, or a peft adapter family (LoRA) for this architecture."
        )
    return list(layers)


def add_bottleneck_adapters(model: torch.nn.Module, config: BottleneckConfig | dict, trainable_heads=("score", "classifier")) -> BottleneckAdapterModel:
    """Freeze ``model`` and add trainable bottleneck adapters to its decoder layers; a head named
    in ``trainable_heads`` (a reward model's score) stays trainable and is saved with them."""
    config = _as_config(config)
    if isinstance(model, BottleneckAdapterModel) or any(isinstance(m, BottleneckAdapter) for m in model.modules()):
        raise TunelabError(f"This {type(model).__name__} already has bottleneck adapters; add them to a fresh base model.")
    layers = _decoder_layers(model, config.placement)
    if config.layers is not None and config.layers[-1] >= len(layers):
        raise TunelabError(f"{FIELD}.layers={config.layers} names a layer that {type(model).__name__} lacks: it has layers 0..{len(layers) - 1}.")
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    hidden = text_config.hidden_size
    model.requires_grad_(False)
    for index in config.layers if config.layers is not None else range(len(layers)):
        for place in config.placement:
            block = getattr(layers[index], BLOCKS[place])
            adapter = BottleneckAdapter(hidden, config, *_weight_dtype_device(block, model))
            adapter.train(block.training)  # a model loaded by from_pretrained is in eval mode
            block.add_module(ADAPTER, adapter)
            block.register_forward_hook(_apply_adapter)
    heads = [name for name in trainable_heads if isinstance(getattr(model, name, None), torch.nn.Module)]
    for name in heads:
        getattr(model, name).requires_grad_(True)
    return BottleneckAdapterModel(model, config, heads)


def is_bottleneck_folder(folder) -> bool:
    """Whether ``folder`` holds a bottleneck adapter written by ``save_pretrained``."""
    try:
        return json.loads((Path(folder) / CONFIG_NAME).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def load_bottleneck_adapters(model: torch.nn.Module, folder, trainable: bool = False) -> BottleneckAdapterModel:
    """Add the adapters saved in ``folder`` to a freshly loaded base ``model`` (frozen unless
    ``trainable``)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    config_file, weights_file = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if not is_bottleneck_folder(folder):
        why = "is missing" if not config_file.exists() else f"is not a {FORMAT} config (no \"format\": \"{FORMAT}\")"
        raise TunelabError(f"'{folder}' is not a bottleneck adapter folder: {config_file.name} {why}. Point at a folder written by BottleneckAdapterModel.save_pretrained.")
    if not weights_file.exists():
        raise TunelabError(f"Bottleneck adapter folder '{folder}' has {config_file.name} but no {weights_file.name}; it was not saved completely.")
    meta = json.loads(config_file.read_text())
    if meta.get("version") != VERSION:
        raise TunelabError(f"'{config_file}' is {FORMAT} version {meta.get('version')}; this tunelab reads version {VERSION}.")
    try:
        config = BottleneckConfig(**{f.name: meta[f.name] for f in fields(BottleneckConfig) if f.name in meta})
        state = load_file(weights_file)
    except (TunelabError, SafetensorError) as e:
        raise TunelabError(f"Bottleneck adapter folder '{folder}' cannot be read: {e}") from e
    wrapped = add_bottleneck_adapters(model, config, trainable_heads=meta.get("trainable_heads", ()))
    _check_fits(wrapped, state, folder, meta)
    wrapped.load_state_dict(state, strict=False)
    if not trainable:
        wrapped.requires_grad_(False)
    return wrapped


def _check_fits(wrapped: BottleneckAdapterModel, state: dict[str, torch.Tensor], folder: Path, meta: dict) -> None:
    expected = wrapped.adapter_state_dict()
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    shapes = [
        f"{k} is {list(state[k].shape)} in the file, {list(expected[k].shape)} in the model"
        for k in sorted(expected.keys() & state.keys()) if state[k].shape != expected[k].shape
    ]  # fmt: skip

    def few(keys: list[str]) -> str:
        return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")

    problems = [f"{label} ({len(keys)}): {few(keys)}" for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)) if keys]
    if problems:
        source = meta.get("base_model_name_or_path")
        raise TunelabError(
            f"The bottleneck adapter in '{folder}' does not fit this {type(wrapped.base_model).__name__}: {'; '.join(problems)}. "
            f"Load it onto the base it was trained on (a {meta.get('base_model_class')}{f' from {source}' if source else ''})."
        )
