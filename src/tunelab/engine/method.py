"""The method protocol: everything the engine calls on a method, in the order it calls it.

A method (SFT, reward modeling, DPO, and later GRPO, PPO, pretraining) says what is optimised;
the engine (``engine/trainer.py``) runs every method the same way. The engine knows a method only
through ``Method`` below:

1. ``check()``: refuse option combinations that cannot run, before anything is loaded.
2. ``build_data(data_cfg, tokenizer)``: files -> tokenized train/validation splits and a report.
3. ``build_models(pool, tokenizer)``: the trained model and any frozen models the method needs
   (a DPO reference, a reward model, ...). The engine sets every one of them up through Fabric on
   the same device, precision and strategy; frozen ones in eval mode with no gradients. A method
   never moves a model to a device.
4. ``prepare_data(splits, model, frozen, batches)``: once, after set-up and before the first step;
   it may run the models over the data (``batches(dataset)`` yields collated device batches in
   order) and returns the splits and the frozen models still needed for training (DPO with
   precomputed reference log-probabilities returns none, and the engine frees the reference).
   It runs on every rank at once (sharded or DDP-wrapped models communicate in their forward).
5. ``collate_fn(tokenizer)`` and ``examples_per_batch(batch_size)``: how dataset items become a
   batch.
6. Every step: ``before_step(model, frozen, batches, step)`` on the step's micro-batches (already
   on the device) before any loss is taken (``step``: the steps done so far, counted across
   resumes); online methods generate there with the current weights and return the batches to
   train on, DPO adds its live reference's log-probabilities. ``updates(batches, step)`` groups
   them into the optimizer steps taken on them: one (all the micro-batches) for most methods,
   ``updates_per_step()`` for methods that reuse what they generated (PPO's epochs times
   mini-batches, GRPO's iterations). Then, per optimizer step and micro-batch,
   ``loss_units(batch)`` (what the loss is normalised by, counted before the forward pass) and
   ``loss(model, batch)`` -> ``LossResult``.
7. ``finalize(model, output_dir, tokenizer)``: work after the last checkpoint, on rank 0.

Before the first step the engine also asks for ``estimate`` (memory and time) and
``flops_per_token`` (for the model FLOPs utilisation it logs); both may be None.

A method that carries state between steps (PPO's adaptive KL coefficient) returns it from
``state_dict()``; checkpoints keep it and a resume hands it back through ``load_state_dict``.

After ``check``, the engine sets ``run_dir`` (the run's output folder) for the
files a method writes itself (GRPO's generation samples); only rank 0 should write there.

``loss_unit`` names what the units are (supervised tokens, pairs, sequences); the engine weights
every unit equally across micro-batches and devices and reports throughput in them.
"""

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Iterator, NamedTuple

import torch

from tunelab.engine.options import TrainingOptions


class LossResult(NamedTuple):
    """What ``Method.loss`` returns for one micro-batch."""

    loss: torch.Tensor
    """The loss summed (not averaged) over the batch's units, so the engine can weight units equally."""
    units: int | torch.Tensor
    """How many units the sum runs over (supervised tokens, pairs, ...)."""
    metrics: dict
    """Extra metrics, each summed over the same units (the engine divides by the step's units)."""


class DataSplits(NamedTuple):
    train: object
    val: object | None
    report: object


@dataclass
class Models:
    """What ``build_models`` returns: the model the optimizer trains, frozen helpers by name, and
    optionally the optimizer's parameter groups, when some of the trained parameters need options
    of their own (PPO's value model: ``method.value_lr``). A group's ``lr_scale`` multiplies the
    learning-rate schedule for it. Without groups, every trainable parameter is one group."""

    trained: torch.nn.Module
    frozen: dict[str, torch.nn.Module] = field(default_factory=dict)
    param_groups: list[dict] | None = None


Batches = Callable[[object], Iterator[dict]]


class Method(TrainingOptions, ABC):
    """Base class of every training method. Subclasses are dataclasses; their fields are the
    method's config options (``method.*``), next to the engine options of ``TrainingOptions``."""

    loss_unit: ClassVar[str] = "token"
    """What ``loss_units`` counts: 'token' (supervised tokens), 'pair', 'sequence'."""

    generates_before_step: ClassVar[bool] = False
    """True when ``before_step`` runs the trained model (online methods generate there). The engine
    then reads the previous step's numbers before it, so generation never runs on weights that a
    non-finite loss broke; otherwise a step that is only logged is read after the next step's work
    is queued."""

    run_dir = None  # set by the engine: the run's output folder (a plain attribute, not a config option)

    @abstractmethod
    def build_data(self, data_cfg, tokenizer) -> DataSplits:
        ...

    @abstractmethod
    def build_models(self, pool, tokenizer) -> Models:
        ...

    def prepare_data(self, splits: DataSplits, model: torch.nn.Module, frozen: dict, batches: Batches) -> tuple[DataSplits, dict]:
        return splits, frozen

    @abstractmethod
    def collate_fn(self, tokenizer) -> Callable[[list[dict]], dict]:
        ...

    def before_step(self, model: torch.nn.Module, frozen: dict, batches: list[dict], step: int) -> list[dict]:
        return batches

    def updates(self, batches: list[dict], step: int) -> list[list[dict]]:
        """The step's micro-batches grouped into ``updates_per_step()`` optimizer steps, in order
        (``updates_per_step`` is an engine option's method, ``TrainingOptions``: the scheduler's
        ``_T_max_`` counts optimizer steps)."""
        return [batches]

    def state_dict(self) -> dict:
        """What the method changes while it trains, for checkpoints (plain values and tensors)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    @abstractmethod
    def loss_units(self, batch: dict) -> int | torch.Tensor:
        ...

    @abstractmethod
    def loss(self, model: torch.nn.Module, batch: dict) -> LossResult:
        ...

    def finalize(self, model: torch.nn.Module, output_dir, tokenizer) -> dict:
        """Returns named output paths (e.g. ``{"merged": path}``); none by default."""
        return {}

    def flops_per_token(self, model: torch.nn.Module, train_set) -> float | None:
        """Model FLOPs per training token (``planning.model_flops_per_token``), from which the
        engine logs ``train/mfu``; None (the default): no MFU is reported."""
        return None

    def estimate(self, model: torch.nn.Module, train_set, device, precision: str, steps: int):
        """A ``planning.RunEstimate`` of memory and time before the first step, or None."""
        return None
