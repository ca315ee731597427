"""tunelab plan compute: the engine's estimate on a model built on the meta device, for full
fine-tuning, LoRA and QLoRA, with or without checkpointing, on named GPUs; and the estimate
against what the benchmark runs measured here (bench/calibration.json)."""

import json
from pathlib import Path

import pytest

from tunelab.cli.main import main
from tunelab.errors import UsageError
from tunelab.planning.compute import GPUS, plan_compute

GiB = 2**30


def test_a_7b_plan_counts_what_each_method_keeps():
    full, lora, qlora = (plan_compute("llama2-7b", m, batch_size=4, max_length=2048, gpu="h100", precision="bf16-true", checkpointing=True)
                         for m in ("full", "lora", "qlora"))  # fmt: skip
    assert full.estimate.parameters == pytest.approx(6.74e9, rel=0.005)  # Llama-2-7B's published size
    assert full.estimate.trainable == full.estimate.parameters
    # full fine-tuning: 2 bytes of bf16 weights and gradients, 8 of AdamW's moments, per parameter
    assert full.estimate.weights_gib == pytest.approx(6.74e9 * 2 / GiB, rel=0.01) and full.estimate.optimizer_gib == pytest.approx(6.74e9 * 8 / GiB, rel=0.01)
    # LoRA r=16 on every linear layer of 32 layers: r x (in + out) per matrix
    per_layer = 16 * ((4096 + 4096) * 4 + (4096 + 11008) * 3)
    assert lora.estimate.trainable == 32 * per_layer
    assert qlora.estimate.weights_gib < lora.estimate.weights_gib / 3  # NF4: about 4.1 bits instead of 16 for the layers' matrices
    assert not full.fits["h100"] and full.fits["h200"] is (full.estimate.peak_gib <= 141e9 / GiB)
    assert lora.fits["a100-40g"] and qlora.fits["t4"] and not lora.fits["t4"]
    assert full.estimate.seconds_per_step > lora.estimate.seconds_per_step  # no weight gradients to compute


def test_checkpointing_trades_activations_for_a_second_forward_pass():
    kept = plan_compute("llama3-8b", "lora", batch_size=4, max_length=2048, gpu="a100-80g")
    recomputed = plan_compute("llama3-8b", "lora", batch_size=4, max_length=2048, gpu="a100-80g", checkpointing=True)
    assert recomputed.estimate.activations_gib < kept.estimate.activations_gib / 5
    # frozen weights: 4 FLOPs per parameter and token (forward, input gradients); recomputing adds the forward's 2
    assert recomputed.estimate.flops_per_step / kept.estimate.flops_per_step == pytest.approx(1.5, rel=0.05)
    assert kept.estimate.matmul_tflops == pytest.approx(GPUS["a100-80g"][1] * 0.8)


def test_bad_input_is_refused_by_name(capsys):
    with pytest.raises(UsageError, match="not a shipped model pool"):
        plan_compute("gpt-17", "full")
    with pytest.raises(UsageError, match="--mean-length 900"):
        plan_compute("llama2-7b", "lora", max_length=512, mean_length=900, gpu="h100")
    assert main(["plan", "compute", "--model", "llama2-7b", "--gpu", "v100"]) == 2
    assert "invalid choice: 'v100'" in capsys.readouterr().err
    assert main(["plan", "compute", "--model", "llama2-7b", "--method", "qlora", "--gpu", "l4", "--checkpointing", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["fits"]["l4"] is True


CALIBRATION = Path(__file__).resolve().parents[2] / "bench" / "calibration.json"


@pytest.mark.parametrize("entry", json.loads(CALIBRATION.read_text()) if CALIBRATION.is_file() else [], ids=lambda e: f"{e['run']}-{e['device']}")
def test_the_plan_is_within_25_percent_of_what_the_benchmark_runs_measured(entry):
    settings = {k: v for k, v in entry["plan"].items() if k != "model_config"}
    plan = plan_compute("calibration", **settings, config=entry["plan"]["model_config"])
    measured = entry["measured"]
    assert plan.estimate.peak_gib == pytest.approx(measured["peak_gib"], rel=0.25)
    assert plan.estimate.seconds_per_step == pytest.approx(measured["seconds_per_step"], rel=0.25)


def test_calibration_entries_exist_for_full_fine_tuning_and_lora():
    runs = {e["plan"]["method"] for e in json.loads(CALIBRATION.read_text())}
    assert {"full", "lora"} <= runs
