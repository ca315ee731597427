"""LoRA updates for a batch whose rows use different adapters, in two matrix products per layer.

peft's mixed-adapter batches (``adapter_names=``) run, in every LoRA layer, a gather of each
adapter's rows, its two low-rank products and a scatter back: four adapters cost 20-odd small
operations a layer, and on a CPU that made a 16-row decoding step 1.6x a one-adapter step. Here the
adapters' matrices are stacked once per set of adapters, ``A`` (all ranks, one after the other, by
input) and ``B`` (output by all ranks, each adapter's scaling folded in), and every row takes

    delta = ((x @ A.T) * row_mask) @ B.T

where ``row_mask`` keeps the rank columns of that row's adapter (none for a row that asks for the
base). The base layer runs as peft runs it with its adapters disabled; a forward hook adds
``delta``. peft's path stays the reference (``tunelab serve --mixed-lora peft``), and the tests
compare the two.

    mixed = StackedLoRA(peft_model, ["gsm8k", "alpaca"])
    with peft_model.disable_adapter(), mixed:
        mixed.set_rows(["gsm8k", None, "alpaca"])     # None: the base
        logits = peft_model(input_ids).logits
"""

import torch


def _lora_linears(model):
    from peft.tuners.lora.layer import Linear

    return [m for m in model.modules() if isinstance(m, Linear)]


def stackable(model, adapters: list[str]) -> bool:
    """Whether every layer that holds one of ``adapters`` is a plain LoRA linear layer (no DoRA or
    other variant, no LoRA bias, no embedding or convolution LoRA)."""
    from peft.tuners.lora.layer import Linear, LoraLayer

    wanted = set(adapters)
    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        held = wanted & (set(module.lora_A) | set(getattr(module, "lora_embedding_A", {})))
        if not held:
            continue
        if not isinstance(module, Linear) or held & set(getattr(module, "lora_variant", {})):
            return False
        if any(module.lora_B[name].bias is not None for name in held):
            return False
    return True


class StackedLoRA:
    """Forward hooks that add each row's own adapter update to every LoRA linear layer."""

    def __init__(self, model, adapters: list[str]):
        self.adapters = list(adapters)
        self.layers = []  # (module, A, B, mask rows) per LoRA linear layer that holds one of the adapters
        index = {name: k + 1 for k, name in enumerate(self.adapters)}  # 0: the base
        for module in _lora_linears(model):
            held = [name for name in self.adapters if name in module.lora_A]
            if not held:
                continue
            a = torch.cat([module.lora_A[name].weight for name in held], dim=0)
            b = torch.cat([module.lora_B[name].weight * module.scaling[name] for name in held], dim=1)
            masks = torch.zeros(len(self.adapters) + 1, a.shape[0], dtype=a.dtype, device=a.device)
            column = 0
            for name in held:
                rank = module.lora_A[name].weight.shape[0]
                masks[index[name], column : column + rank] = 1
                column += rank
            self.layers.append((module, a, b, masks))
        self.index = index
        self.rows = None  # each row's adapter number, set before every forward pass
        self.handles = []

    def set_rows(self, names: list[str | None]) -> None:
        """Each row's adapter for the next forward passes (None: the base)."""
        first = self.layers[0][1] if self.layers else None
        self.rows = torch.tensor([self.index[n] if n is not None else 0 for n in names], device=first.device if first is not None else "cpu")

    def __enter__(self):
        for module, a, b, masks in self.layers:
            self.handles.append(module.register_forward_hook(self._hook(a, b, masks)))
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def _hook(self, a, b, masks):
        def add_update(_module, args, output):
            x = args[0]
            keep = masks[self.rows]  # (rows, ranks)
            low = (x.to(a.dtype) @ a.T) * (keep[:, None, :] if x.dim() == 3 else keep)
            return output + (low @ b.T).to(output.dtype)

        return add_update
