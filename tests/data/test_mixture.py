"""Mixtures of data sources: each strategy's shares by hand, epochs drawn exactly as planned,
replay ratios, an SFT run that reports its realised mix and per-source held-out loss and resumes
exactly mid-mixture, and the refusals."""

import json
from pathlib import Path

import pytest
import torch

from tunelab.config import DataConfig, compose_config
from tunelab.data.mixture import MixtureReport, allocate, mixture_shares
from tunelab.engine import train
from tunelab.errors import TunelabError


def test_shares_by_hand():
    assert mixture_shares([100, 300], [1, 1], "proportional") == pytest.approx([0.25, 0.75])
    assert mixture_shares([100, 300], [3, 1], "proportional") == pytest.approx([0.5, 0.5])
    assert mixture_shares([100, 300], [1, 1], "equal") == pytest.approx([0.5, 0.5])
    assert mixture_shares([100, 300], [1, 3], "equal") == pytest.approx([0.25, 0.75])
    assert mixture_shares([100, 300], [1, 1], "temperature", 2.0) == pytest.approx([10 / (10 + 300**0.5), 300**0.5 / (10 + 300**0.5)])


def test_temperature_one_is_proportional_and_large_temperatures_approach_equal():
    sizes, weights = [50, 400, 2000], [1, 2, 1]
    assert mixture_shares(sizes, weights, "temperature", 1.0) == pytest.approx(mixture_shares(sizes, weights, "proportional"))
    hot = mixture_shares(sizes, [1, 1, 1], "temperature", 1000.0)
    assert hot == pytest.approx([1 / 3] * 3, abs=3e-3)
    warmer = [mixture_shares(sizes, [1, 1, 1], "temperature", t)[0] for t in (1, 2, 4, 16)]
    assert warmer == sorted(warmer)  # the small source's share grows with the temperature


def test_allocation_sums_to_the_epoch_and_epochs_draw_exactly_the_counts():
    counts = allocate([0.2, 0.5, 0.3], 7)
    assert sum(counts) == 7 and counts == [1, 4, 2]  # 1.4, 3.5, 2.1: the largest remainder (0.5) gets the spare one
    plan = MixtureReport(names=["a", "b"], sizes=[3, 10], counts=[7, 4], offsets=[0, 3])
    first = plan.epoch_indices(seed=1, epoch=0)
    assert len(first) == 11
    a = [i for i in first if i < 3]
    b = [i for i in first if i >= 3]
    assert len(a) == 7 and all(a.count(i) >= 2 for i in range(3))  # two whole passes, then one more example
    assert len(b) == 4 and len(set(b)) == 4  # a different part of the larger source in each epoch ...
    assert plan.epoch_indices(seed=1, epoch=0) == first  # ... and the same draw for the same seed and epoch
    assert any(sorted(i for i in plan.epoch_indices(seed=1, epoch=e) if i >= 3) != sorted(b) for e in range(1, 4))


DEMO = "pkg://tunelab/demo_data/gsm8k_demo.jsonl"


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("sources")
    alpaca = folder / "general.jsonl"
    alpaca.write_text("".join(json.dumps({"instruction": f"Name a colour number {i}.", "input": "", "output": f"Colour {i} is blue."}) + "\n" for i in range(12)))
    return {
        "task": {"path": DEMO, "format": "prompt_completion", "prompt_field": "question", "completion_field": "answer", "max_samples": 24},
        "general": {"path": str(alpaca), "format": "alpaca"},
    }


def mixture_overrides(sources: dict, out: Path, *extra: str, **source_options) -> list[str]:
    listing = []
    for name, options in sources.items():
        options = {**options, **source_options.get(name, {}), "name": name}
        listing.append("{" + ", ".join(f"{k}: '{v}'" if isinstance(v, str) else f"{k}: {v}" for k, v in options.items()) + "}")
    return [
        "data=mixture", f"data.sources=[{', '.join(listing)}]", "modelpool=CausalLMPool/tiny-llama", f"data.cache_dir={out.parent / 'cache'}",
        "method.max_length=192", "method.dataloader_kwargs.batch_size=4", "method.optimizer.lr=1e-3", "method.lr_scheduler.warmup_steps=2",
        f"output_dir={out}", "progress_bar=false", "fabric.precision=32-true", *extra,
    ]  # fmt: skip


def test_sft_mixture_reports_its_realised_mix_and_per_source_heldout_loss(sources, tmp_path):
    result = train(compose_config(mixture_overrides(
        sources, tmp_path / "mix", "data.replay_ratio=0.25", "data.val_fraction=0.25", "data.epoch_size=16", "taskpool=heldout-loss",
        "method.max_steps=6", general={"role": "replay"},
    )))  # fmt: skip
    mixture = json.loads((tmp_path / "mix/summary.json").read_text())["data"]["mixture"]
    assert mixture["counts"] == [12, 4] and mixture["shares"] == pytest.approx([0.75, 0.25])  # 16 an epoch, a quarter replay
    realised = mixture["realised"]
    assert realised["task"]["examples"] + realised["general"]["examples"] == 24  # 6 steps x 4: one epoch of 16, half of the next
    assert realised["general"]["examples"] >= 4 and realised["general"]["tokens"] > 0
    final = result.evaluations[6]
    assert {"val/loss/task", "val/loss/general", "val/perplexity/task"} <= set(final)
    # The whole validation split's loss lies between its two sources' losses.
    assert min(final["val/loss/task"], final["val/loss/general"]) <= final["val/loss"] <= max(final["val/loss/task"], final["val/loss/general"])


def test_resume_mid_mixture_is_exact(sources, tmp_path):
    exact = ("data.mixing=equal", "data.epoch_size=20", "method.max_steps=7", "method.save_optimizer_state=true", "method.checkpoint_save_interval=step")
    full = train(compose_config(mixture_overrides(sources, tmp_path / "full", *exact)))
    resumed = train(compose_config(mixture_overrides(sources, tmp_path / "resumed", *exact, f"method.ckpt_path={tmp_path / 'full/checkpoints/step-000003'}")))
    a = torch.load(full.final_checkpoint / "state.ckpt", weights_only=True)["model"]
    b = torch.load(resumed.final_checkpoint / "state.ckpt", weights_only=True)["model"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize(
    "extra, options, message",
    [
        ([], {"general": {"weight": 0}}, r"data.sources\[1\].weight=0: a weight must be a positive number"),
        ([], {"general": {"weight": -2}}, r"data.sources\[1\].weight=-2"),
        ([], {"general": {"format": "preference"}}, "mixes formats that need different methods.*general: format=preference"),
        (["data.replay_ratio=0.3"], {}, "no source has role: replay"),
        (["data.path=x.jsonl"], {}, "data.path and data.sources are both set"),
        ([], {"general": {"colour": "blue"}}, r"data.sources\[1\] has unknown option\(s\) colour"),
        (["data.mixing=temperature", "data.temperature=0"], {}, "data.temperature. is 0, but it must be positive"),
    ],
)
def test_bad_mixtures_are_refused_before_training(sources, tmp_path, extra, options, message):
    with pytest.raises(TunelabError, match=message):
        train(compose_config(mixture_overrides(sources, tmp_path / "bad", "method.max_steps=1", *extra, **options)))
    assert not (tmp_path / "bad/checkpoints").exists()


def test_pretraining_mixes_text_sources(tmp_path, tokenizer):
    from tunelab.data import build_mixed, build_text_blocks

    (tmp_path / "a.txt").write_text("\n\n".join(f"Alpha paragraph {i} " * 5 for i in range(30)))
    (tmp_path / "b.txt").write_text("\n\n".join(f"Beta {i}" for i in range(10)))
    cfg = DataConfig(sources=[{"path": str(tmp_path / "a.txt"), "format": "text"}, {"path": str(tmp_path / "b.txt"), "format": "text", "weight": 4}],
                     mixing="equal", cache_dir=str(tmp_path / "cache"))  # fmt: skip
    train_set, _, report = build_mixed(cfg, lambda source: build_text_blocks(source, tokenizer, 16))
    mixture = report.mixture
    assert mixture.names == ["a", "b"] and mixture.shares == pytest.approx([0.2, 0.8])
    assert sum(mixture.counts) == len(train_set) and set(train_set.column_names) == {"input_ids", "segments"}


def test_an_eval_source_is_only_held_out_and_the_summary_reports_what_was_forgotten(sources, tmp_path):
    result = train(compose_config(mixture_overrides(
        sources, tmp_path / "eval", "data.val_fraction=0.2", "taskpool=heldout-loss", "method.max_steps=4", "method.optimizer.lr=3e-3",
        general={"role": "eval"},
    )))  # fmt: skip
    summary = json.loads((tmp_path / "eval/summary.json").read_text())
    mixture = summary["data"]["mixture"]
    assert mixture["sizes"][1] == 0 and mixture["counts"][1] == 0 and mixture["realised"]["general"]["examples"] == 0
    assert mixture["val_sizes"][1] == 12  # every example of the eval source is held out
    report = summary["heldout_by_source"]
    assert report["general"]["role"] == "eval" and report["general"]["step_before"] == 0 and report["general"]["step_after"] == 4
    assert report["general"]["loss_after"] == pytest.approx(result.evaluations[4]["val/loss/general"])
    assert report["task"]["loss_after"] < report["task"]["loss_before"]
    header = (tmp_path / "eval/metrics.csv").read_text().splitlines()[0]
    assert "val/loss/general" in header and (tmp_path / "eval/loss_curve.png").exists()
