"""Elastic weight consolidation: zero penalty at the starting weights, its gradient by hand, the
Fisher of LoRA's trainable parameters only, an SFT run that logs the penalty apart from the task
loss, and the refusals."""

import json
from pathlib import Path

import pytest
import torch

from tunelab.config import compose_config
from tunelab.engine import train
from tunelab.errors import TunelabError
from tunelab.methods.ewc import ElasticWeightConsolidation, diagonal_fisher, ewc_options

DEMO = "pkg://tunelab/demo_data/gsm8k_demo.jsonl"


def test_penalty_is_zero_at_the_start_and_its_gradient_matches_a_hand_computation():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    model[1].weight.requires_grad_(False)  # frozen parameters take no part
    fisher = {name: torch.rand_like(p) for name, p in model.named_parameters() if p.requires_grad}
    ewc = ElasticWeightConsolidation(model, fisher, strength=3.0)
    assert set(ewc.anchors) == {"0.weight", "0.bias", "1.bias"}
    assert ewc.penalty(model).item() == 0.0
    start = {name: p.detach().clone() for name, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    penalty = ewc.penalty(model)
    expected = sum(0.5 * 3.0 * (fisher[n] * (p - start[n]) ** 2).sum() for n, p in model.named_parameters() if n in fisher)
    torch.testing.assert_close(penalty, expected)
    penalty.backward()
    for name, p in model.named_parameters():
        if name in fisher:
            torch.testing.assert_close(p.grad, 3.0 * fisher[name] * (p.detach() - start[name]))
        else:
            assert p.grad is None


def test_fisher_is_the_mean_squared_per_example_gradient():
    from tunelab.engine.method import LossResult

    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1, bias=False)
    xs = [torch.tensor([[1.0, 2.0]]), torch.tensor([[-1.0, 0.5]])]

    def loss(m, x):
        return LossResult((m(x) ** 2).sum(), 1, {})

    fisher = diagonal_fisher(model, xs, loss)
    w = model.weight.detach()
    grads = [(2 * (x @ w.T) * x) for x in xs]  # d(wx)^2/dw = 2 (w.x) x
    torch.testing.assert_close(fisher["weight"], (grads[0] ** 2 + grads[1] ** 2) / 2)


def run(out: Path, *extra: str):
    return train(compose_config([
        "modelpool=CausalLMPool/tiny-llama", f"data.path={DEMO}", "data.prompt_field=question", "data.completion_field=answer",
        "data.max_samples=16", f"data.cache_dir={out.parent / 'cache'}", "method.max_length=192", "method.dataloader_kwargs.batch_size=4",
        "method.optimizer.lr=1e-3", "method.lr_scheduler=null", "method.max_steps=3", f"output_dir={out}", "progress_bar=false",
        "fabric.precision=32-true", *extra,
    ]))  # fmt: skip


@pytest.fixture(scope="module")
def general(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("general") / "general.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"Say colour {i}.", "input": "", "output": f"Colour {i}."}) + "\n" for i in range(10)))
    return path


def test_sft_with_ewc_logs_the_penalty_apart_from_the_task_loss(tmp_path, general):
    ewc = f"method.ewc={{lambda: 1000.0, fisher_data: '{general}', fisher_format: alpaca, fisher_batches: 6}}"
    result = run(tmp_path / "ewc", ewc, "method.fix_token_embedding=false")
    header, *rows = (tmp_path / "ewc/metrics.csv").read_text().splitlines()
    columns = header.split(",")
    values = [dict(zip(columns, r.split(","))) for r in rows if r.split(",")[columns.index("train/loss")]]
    penalties = [float(v["train/ewc_penalty"]) for v in values]
    assert penalties[0] == 0.0 and penalties[-1] > 0  # nothing to hold back before the first update
    for v in values:  # loss = the task's loss + the penalty
        assert float(v["train/loss"]) == pytest.approx(float(v["train/task_loss"]) + float(v["train/ewc_penalty"]), rel=1e-5)
    saved = (tmp_path / "ewc/ewc_fisher.safetensors")
    from safetensors.torch import load_file

    tensors = load_file(saved)
    assert any(k.startswith("fisher.") for k in tensors) and all(v.isfinite().all() for v in tensors.values())
    plain = run(tmp_path / "plain", "method.fix_token_embedding=false")
    strong = run(tmp_path / "strong", ewc.replace("1000.0", "1e7"), "method.fix_token_embedding=false")

    # A very strong EWC keeps the weights nearer the start than plain SFT does.
    start = run(tmp_path / "start", "method.max_steps=1", "method.optimizer.lr=1e-30").final_checkpoint
    s = torch.load(start / "state.ckpt", weights_only=True)["model"]

    def distance(r):
        w = torch.load(r.final_checkpoint / "state.ckpt", weights_only=True)["model"]
        return sum(((w[k].float() - s[k].float()) ** 2).sum().item() for k in w)

    assert distance(strong) < distance(plain)
    assert result.state.global_step == 3


def test_lora_ewc_touches_only_adapter_parameters(tmp_path, general, tiny_base_model):
    ewc = f"method.ewc={{lambda: 10.0, fisher_data: '{general}', fisher_format: alpaca, fisher_batches: 4}}"
    run(tmp_path / "lora", "method=lm_finetune/peftfinetune_sft", f"modelpool.model_path={tiny_base_model}", "modelpool.config=null",
        "method.peft_config.r=4", ewc, "method.max_steps=2")  # fmt: skip
    from safetensors.torch import load_file

    names = [k.split(".", 1)[1] for k in load_file(tmp_path / "lora/ewc_fisher.safetensors") if k.startswith("fisher.")]
    assert names and all("lora_" in n for n in names)


@pytest.mark.parametrize(
    "node, message",
    [
        ("{lambda: 10.0}", "method.ewc needs method.ewc.fisher_data"),
        ("{lambda: -1.0, fisher_data: x.jsonl}", r"method.ewc.lambda=-1.0 must be a positive number"),
        ("{fisher_data: x.jsonl, batches: 3}", r"unknown option\(s\) batches"),
    ],
)
def test_bad_ewc_options_are_refused(tmp_path, node, message):
    with pytest.raises(TunelabError, match=message):
        run(tmp_path / "bad", f"method.ewc={node}")


def test_ewc_is_refused_where_the_loss_is_not_sfts(tmp_path):
    with pytest.raises(TunelabError, match="DirectPreferenceOptimization does not take it yet"):
        train(compose_config(["method=lm_finetune/dpo", "modelpool=CausalLMPool/tiny-llama", "+method.ewc={fisher_data: x.jsonl}",
                              f"output_dir={tmp_path / 'dpo'}", "data.path=x.jsonl", "data.format=preference"]))  # fmt: skip
    assert ewc_options(None) is None
