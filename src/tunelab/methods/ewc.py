"""Elastic weight consolidation (EWC): a penalty that holds the weights general data depends on
near their starting values while a run learns its task, so it forgets less.

    penalty = lambda / 2 * sum_i F_i * (theta_i - theta*_i) ** 2

theta* are the weights at the start of the run and F is the diagonal of the empirical Fisher
information there: the mean, over ``fisher_batches`` examples of ``fisher_data`` taken one at a
time, of the squared gradient of each example's mean token loss. Only trainable parameters take
part: under LoRA, the adapter's (at the start, LoRA's B matrices are zero, so only they get a
Fisher weight).
"""

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from tunelab.errors import TunelabError
from tunelab.progress import progress_bar

log = logging.getLogger(__name__)

OPTIONS = ("lambda", "fisher_data", "fisher_format", "fisher_batches")


@dataclass
class EWCOptions:
    strength: float
    """method.ewc.lambda: how hard the Fisher-weighted distance to the starting weights is penalised."""
    fisher_data: str
    fisher_format: str | None = None
    """The reference set's data.format (default: the run's)."""
    fisher_batches: int = 64
    """Examples of fisher_data (one per batch) the Fisher is averaged over."""


def ewc_options(node: dict | None) -> EWCOptions | None:
    """``method.ewc`` -> options, refusing what cannot run (before anything is loaded)."""
    if node is None:
        return None
    if not isinstance(node, dict):
        raise TunelabError(f"method.ewc must be a mapping ({', '.join(OPTIONS)}) or null, got {node!r}.")
    unknown = sorted(set(node) - set(OPTIONS))
    if unknown:
        raise TunelabError(f"method.ewc has unknown option(s) {', '.join(unknown)}; it takes {', '.join(OPTIONS)}.")
    if not node.get("fisher_data"):
        raise TunelabError(
            "method.ewc needs method.ewc.fisher_data: a file of general examples (e.g. the data the model was "
            "tuned on before) whose loss the Fisher information is measured on; set method.ewc=null to train without EWC."
        )
    strength = node.get("lambda", 1.0)
    if not isinstance(strength, (int, float)) or isinstance(strength, bool) or not strength > 0 or not math.isfinite(strength):
        raise TunelabError(f"method.ewc.lambda={strength!r} must be a positive number (larger: stay closer to the starting weights).")
    batches = node.get("fisher_batches", 64)
    if not isinstance(batches, int) or isinstance(batches, bool) or batches < 1:
        raise TunelabError(f"method.ewc.fisher_batches={batches!r} must be a positive whole number of examples.")
    return EWCOptions(float(strength), str(node["fisher_data"]), node.get("fisher_format"), batches)


def diagonal_fisher(model: torch.nn.Module, batches, loss) -> dict[str, torch.Tensor]:
    """Mean squared gradient of each batch's mean loss, per trainable parameter (``batches``:
    one example each, for the empirical Fisher's diagonal; ``loss(model, batch)`` -> LossResult)."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    fisher = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    was_training = model.training
    model.eval()  # no dropout: the Fisher of the model as it is
    count = 0
    batches = list(batches)
    bar = progress_bar(len(batches), desc="EWC: Fisher information")
    for batch in batches:
        model.zero_grad(set_to_none=True)
        result = loss(model, batch)
        units = torch.as_tensor(result.units).clamp(min=1)
        (result.loss / units).backward()
        for name, p in params.items():
            if p.grad is not None:
                fisher[name] += p.grad.detach().float() ** 2
        count += 1
        bar.update(1)
    bar.close()
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return {name: f / max(count, 1) for name, f in fisher.items()}


class ElasticWeightConsolidation:
    """The penalty for a model whose trainable parameters start at their current values."""

    def __init__(self, model: torch.nn.Module, fisher: dict[str, torch.Tensor], strength: float):
        self.strength = strength
        self.fisher = fisher
        self.anchors = {name: p.detach().clone() for name, p in model.named_parameters() if name in fisher}

    def penalty(self, model: torch.nn.Module) -> torch.Tensor:
        terms = [
            (self.fisher[name] * (p.float() - self.anchors[name].float()) ** 2).sum()
            for name, p in model.named_parameters() if name in self.fisher
        ]  # fmt: skip
        return 0.5 * self.strength * torch.stack(terms).sum()

    def save(self, path: Path) -> None:
        """The Fisher and the starting weights, for inspection (safetensors; names as trained)."""
        from safetensors.torch import save_file

        tensors = {f"fisher.{k}": v.contiguous().cpu() for k, v in self.fisher.items()}
        tensors |= {f"anchor.{k}": v.contiguous().cpu() for k, v in self.anchors.items()}
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.tmp")
        save_file(tensors, str(partial), metadata={"lambda": str(self.strength)})
        partial.replace(path)
