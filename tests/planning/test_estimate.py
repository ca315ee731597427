"""The pre-run memory/time estimate: exact parameter arithmetic, and the effects the fast paths
should have on it (packing, the chunked loss, frozen weights)."""

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tunelab.planning import estimate_run
from tunelab.planning.estimate import GiB


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)  # fmt: skip
    return LlamaForCausalLM(config)


LENGTHS = [40, 300, 90, 120, 60, 250, 30, 100]
SUPERVISED = [10, 100, 30, 40, 20, 90, 5, 30]


def estimate(model, **overrides):
    kwargs = dict(precision="32-true", lengths=LENGTHS, supervised=SUPERVISED, batch_size=4, packing=False, steps=10,
                  accumulate=1, chunked_loss=False, loss_chunk_size=1024, device=torch.device("cpu"))  # fmt: skip
    return estimate_run(model, **{**kwargs, **overrides})


def test_weights_gradients_and_adam_state_from_the_parameter_count(model):
    n = sum(p.numel() for p in model.parameters())
    e = estimate(model)
    assert e.parameters == e.trainable == n
    assert e.weights_gib * GiB == pytest.approx(4 * n)
    assert e.gradients_gib * GiB == pytest.approx(4 * n)
    assert e.optimizer_gib * GiB == pytest.approx(8 * n)
    assert e.total_seconds == pytest.approx(10 * e.seconds_per_step)
    assert e.matmul_tflops > 0 and "GiB" in e.describe("cpu")


def test_frozen_weights_need_no_gradients_or_optimizer_state(model):
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        e = estimate(model)
    finally:
        for p in model.parameters():
            p.requires_grad_(True)
    assert e.trainable == 0 and e.gradients_gib == 0 and e.optimizer_gib == 0


def test_packing_and_the_chunked_loss_shrink_the_estimate(model):
    padded, packed = estimate(model), estimate(model, packing=True)
    assert packed.flops_per_step < padded.flops_per_step  # no compute on padding
    assert packed.activations_gib < padded.activations_gib  # 4 longest packed < 4 x longest
    chunked = estimate(model, packing=True, chunked_loss=True, loss_chunk_size=64)
    assert chunked.head_gib < packed.head_gib / 4
    assert chunked.flops_per_step < packed.flops_per_step  # head only on supervised tokens
    assert estimate(model, batch_size=8).activations_gib > padded.activations_gib
