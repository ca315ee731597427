"""A method written here, against the protocol alone, trains through the engine: a student
distilled from a frozen teacher, with its own data, batches, units, per-step hook and frozen model."""

import csv
from dataclasses import dataclass
from typing import ClassVar

import datasets
import pytest
import torch
from omegaconf import OmegaConf

from tunelab.config import compose_config
from tunelab.data import DataReport
from tunelab.engine import DataSplits, LossResult, Method, Models, train
from tunelab.errors import TunelabError

CALLS: list[str] = []
SEEN: dict = {}


@dataclass
class DistillFromTeacher(Method):
    """Minimise the squared distance between the student's and a frozen teacher's logits on
    random token rows; units are sequences."""

    rows: int = 12
    length: int = 10
    nan_at_step: int = 0
    """> 0: the loss of that step's micro-batches is NaN (to test the guard)."""

    loss_unit: ClassVar[str] = "sequence"

    def build_data(self, data_cfg, tokenizer) -> DataSplits:
        CALLS.append("build_data")
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(0, 64, (self.rows, self.length), generator=generator).tolist()
        return DataSplits(datasets.Dataset.from_dict({"input_ids": ids}), None, DataReport())

    def build_models(self, pool, tokenizer) -> Models:
        CALLS.append("build_models")
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
        torch.manual_seed(1)
        teacher = LlamaForCausalLM(config)
        torch.manual_seed(2)
        return Models(LlamaForCausalLM(config), frozen={"teacher": teacher})

    def prepare_data(self, splits, model, frozen, batches):
        CALLS.append("prepare_data")
        SEEN["teacher_before"] = {k: v.clone() for k, v in frozen["teacher"].state_dict().items()}
        SEEN["prepared_rows"] = sum(b["input_ids"].shape[0] for b in batches(splits.train))
        return splits, frozen

    def collate_fn(self, tokenizer):
        return lambda examples: {"input_ids": torch.tensor([e["input_ids"] for e in examples])}

    def before_step(self, model, frozen, batches, step):
        CALLS.append(f"before_step:{len(batches)}")
        teacher = frozen["teacher"]
        SEEN["teacher_mode"] = (teacher.training, any(p.requires_grad for p in teacher.parameters()))
        return [{**b, "target": teacher(input_ids=b["input_ids"]).logits} for b in batches]

    def loss_units(self, batch):
        return batch["input_ids"].shape[0]

    def loss(self, model, batch) -> LossResult:
        if "target" not in batch:
            raise TunelabError("the per-step hook did not run")
        logits = model(input_ids=batch["input_ids"]).logits
        per_row = (logits - batch["target"]).pow(2).mean(dim=(1, 2))
        if self.nan_at_step and CALLS.count("before_step:2") == self.nan_at_step:
            per_row = per_row * float("nan")
        return LossResult(per_row.sum(), batch["input_ids"].shape[0], {"worst": per_row.detach().max() * per_row.shape[0]})


def distill_config(out, *overrides: str, **options):
    cfg = compose_config([f"output_dir={out}", "progress_bar=false", "fabric.precision=32-true", "modelpool=CausalLMPool/tiny-llama", *overrides])
    cfg.method = OmegaConf.merge(
        {key: cfg.method[key] for key in ("optimizer", "dataloader_kwargs")},
        {"_target_": f"{__name__}.DistillFromTeacher", "max_epochs": 4, "accumulate_grad_batches": 2, "lr_scheduler": None, **options},
    )
    cfg.method.optimizer.lr = 1e-2
    cfg.method.dataloader_kwargs.batch_size = 3
    return cfg


def test_a_method_defined_outside_the_package_trains_through_the_protocol(tmp_path):
    CALLS.clear()
    result = train(distill_config(tmp_path / "run"))

    # 12 rows, batch 3, 2 micro-batches a step: 2 steps an epoch, 8 in all
    assert result.state.global_step == 8 and result.loss_unit == "sequence"
    assert CALLS[:3] == ["build_data", "build_models", "prepare_data"]
    assert CALLS[3:] == ["before_step:2"] * 8
    assert SEEN["prepared_rows"] == 12
    assert SEEN["teacher_mode"] == (False, False)  # set up frozen by the engine
    with open(tmp_path / "run/metrics.csv") as f:
        rows = list(csv.DictReader(f))
    losses = [float(r["train/loss"]) for r in rows]
    assert len(losses) == 8 and losses[-1] < 0.5 * losses[0]
    assert all(float(r["train/worst"]) >= float(r["train/loss"]) for r in rows)  # a method's own metric, per unit
    assert result.supervised_tokens_per_s > 0  # units (sequences) per second


def test_a_target_that_is_not_a_method_is_refused(tmp_path):
    cfg = compose_config([f"output_dir={tmp_path}"])
    cfg.method = OmegaConf.create({"_target_": "collections.OrderedDict"})
    with pytest.raises(TunelabError, match="not a tunelab.engine.Method"):
        train(cfg)


def test_numbers_are_read_only_on_logged_steps_and_the_nan_guard_says_so(tmp_path):
    """With log_every_n_steps=3 the loop reads the device on steps 3, 6 and the epoch ends
    (2, 4, ...); a loss that turns NaN on step 1 is caught on step 2, which says it may be earlier."""
    CALLS.clear()
    with pytest.raises(TunelabError, match=r"became nan at step 2 .*may have turned after step 0.*no checkpoint"):
        train(distill_config(tmp_path / "nan", "log_every_n_steps=3", nan_at_step=1))
    CALLS.clear()
    result = train(distill_config(tmp_path / "ok", "log_every_n_steps=3"))
    with open(tmp_path / "ok/metrics.csv") as f:
        logged = [int(r["step"]) for r in csv.DictReader(f)]
    assert logged == [3, 6, 8] and result.state.global_step == 8


@dataclass
class GeneratingDistill(DistillFromTeacher):
    generates_before_step: ClassVar[bool] = True


def test_a_logged_step_is_read_after_the_next_is_queued_unless_the_method_generates_from_the_model(tmp_path, monkeypatch):
    """Two steps an epoch: step 1 is only logged, so its numbers are read (and its line written)
    after step 2's work is queued; step 2 ends the epoch and is read at once. A method that runs
    the model in before_step gets the previous step read (its loss checked) before that."""
    from tunelab.engine.metrics import MetricsCSV

    real_log = MetricsCSV.log
    monkeypatch.setattr(MetricsCSV, "log", lambda self, values, step: CALLS.append(f"log:{step}") or real_log(self, values, step))
    for name, expected in (("DistillFromTeacher", ["before_step:2", "before_step:2", "log:1", "log:2"]),
                           ("GeneratingDistill", ["before_step:2", "log:1", "before_step:2", "log:2"])):  # fmt: skip
        CALLS.clear()
        cfg = distill_config(tmp_path / name)
        cfg.method._target_ = f"{__name__}.{name}"
        train(cfg)
        steps = [c for c in CALLS if c.startswith(("before_step", "log"))]
        assert steps[:4] == expected, name
        assert [c for c in steps if c.startswith("log")] == [f"log:{step}" for step in range(1, 9)]


def test_a_nan_on_a_step_read_late_names_that_step_and_keeps_the_last_good_checkpoint(tmp_path):
    CALLS.clear()
    cfg = distill_config(tmp_path / "nan", nan_at_step=3)  # step 3 is only logged: read during step 4
    with pytest.raises(TunelabError, match=r"became nan at step 3 \(epoch 1\); the run stopped, no checkpoint holds .*step-000002"):
        train(cfg)
    assert CALLS.count("before_step:2") == 4
    assert (tmp_path / "nan/checkpoints/latest").read_text().strip() == "step-000002"  # epoch 0's, before the NaN
