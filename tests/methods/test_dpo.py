"""DPO and its variants: completion-only log-probabilities, every loss by hand, the reference
(copy, adapter switched off, precomputed), accumulation, dropped pairs, bad input, saved models."""

import json
import math

import pytest
import torch

from tunelab.config import DataConfig, compose_config, validate_config
from tunelab.data import IGNORE_INDEX, CompletionPairCollator, build_datasets, tokenize_conversation
from tunelab.engine import train
from tunelab.errors import TunelabError
from tunelab.methods import DirectPreferenceOptimization, preference_losses, sequence_log_probs
from tunelab.methods.dpo import LossType

GOOD = ["Mix flour, water, yeast and salt, then bake.", "Preheat the oven and knead the dough well."]


def pairs_file(tmp_path, n=24, extra=()):
    rows = [{"prompt": f"Question {i}: how do I bake bread?", "chosen": GOOD[i % 2], "rejected": "No."} for i in range(n)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [*rows, *extra]))
    return path


@pytest.fixture(scope="module")
def tiny(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)  # fmt: skip
    return LlamaForCausalLM(config).eval()


def method(**options) -> DirectPreferenceOptimization:
    options = {"compile": False, "dataloader_kwargs": {"batch_size": 4}, **options}
    dpo = DirectPreferenceOptimization(**options)
    dpo.check()
    return dpo


def batch_of(tmp_path, tokenizer, dpo, n=4, **data):
    train_set, _, _ = build_datasets(
        DataConfig(path=str(pairs_file(tmp_path)), format="preference", cache_dir=str(tmp_path / "cache"), **data),
        tokenizer, dpo.max_length, max_prompt_length=dpo.max_prompt_length,
    )  # fmt: skip
    return CompletionPairCollator(tokenizer.pad_token_id, dpo.packing, dpo.pad_to_multiple_of)([train_set[i] for i in range(n)]), train_set


# ----------------------------------------------------------------------------- data


def test_only_the_completion_is_supervised_with_the_sft_template(tmp_path, tokenizer):
    dpo = method()
    _, train_set = batch_of(tmp_path, tokenizer, dpo)
    example = train_set[0]
    messages = [{"role": "user", "content": "Question 0: how do I bake bread?"}, {"role": "assistant", "content": GOOD[0]}]
    ids, labels = tokenize_conversation(tokenizer, messages)  # SFT's rendering of the same conversation
    assert example["chosen_input_ids"] == ids and example["chosen_labels"] == labels
    supervised = tokenizer.decode([t for t in example["chosen_labels"] if t != IGNORE_INDEX])
    assert supervised == GOOD[0] + "<|im_end|>"  # the reply through its end-of-turn token, once
    rejected = tokenizer.decode([t for t in example["rejected_labels"] if t != IGNORE_INDEX])
    assert rejected == "No.<|im_end|>"


def test_multi_turn_pairs_supervise_only_the_replies_after_the_shared_prompt(tokenizer):
    from tunelab.data.tokenize import tokenize_completion_pairs_batch

    chosen = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
              {"role": "user", "content": "Bread?"}, {"role": "assistant", "content": "Knead it."}]  # fmt: skip
    rejected = [*chosen[:3], {"role": "assistant", "content": "No."}]
    out = tokenize_completion_pairs_batch({"chosen": [chosen], "rejected": [rejected]}, tokenizer, 256, "truncate", 128)
    assert tokenizer.decode([t for t in out["chosen_labels"][0] if t != IGNORE_INDEX]) == "Knead it.<|im_end|>"
    assert out["status"] == ["ok"]


def test_truncation_keeps_the_prompt_end_and_drops_pairs_with_nothing_to_learn(tmp_path, tokenizer):
    long_prompt = {"prompt": "word " * 200 + "Which is best?", "chosen": "This one.", "rejected": "That one."}
    same = {"prompt": "Same?", "chosen": "Yes.", "rejected": "Yes."}
    no_room = {"prompt": "x", "chosen": "y " * 300, "rejected": "z"}
    path = pairs_file(tmp_path, n=2, extra=[long_prompt, same, no_room])
    cfg = DataConfig(path=str(path), format="preference", cache_dir=str(tmp_path / "cache"))
    # SmolLM2's template adds a system prompt: the short prompts render to about 40 tokens
    train_set, _, report = build_datasets(cfg, tokenizer, max_length=72, max_prompt_length=48)
    assert report.train.dropped_identical == 1  # chosen == rejected: no preference, never trained on
    assert report.train.truncated == 2 and report.train.examples == 4
    kept = train_set[2]
    assert len(kept["chosen_input_ids"]) <= 72 and "Which is best?" in tokenizer.decode(kept["chosen_input_ids"])
    # a prompt that leaves no room for any completion token is dropped as unsupervised; here all are
    with pytest.raises(TunelabError, match="5 had no supervised"):
        build_datasets(cfg, tokenizer, max_length=20, max_prompt_length=20)


# ----------------------------------------------------------------------------- log-probabilities


def hand_log_probs(model, ids, labels) -> float:
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    log_probs = logits.log_softmax(-1)
    return sum(log_probs[t - 1, labels[t]].item() for t in range(1, len(ids)) if labels[t] != IGNORE_INDEX)


@pytest.mark.parametrize(("packing", "chunked", "multiple"), [(True, True, 1), (True, True, 128), (False, True, 1), (False, False, 1)])
def test_summed_log_probs_equal_a_hand_computation(tmp_path, tokenizer, tiny, packing, chunked, multiple):
    from tunelab.models.kernels import use_packed_attention

    dpo = method(packing=packing, chunked_loss=chunked, fused_kernels=False, pad_to_multiple_of=multiple)
    batch, train_set = batch_of(tmp_path, tokenizer, dpo)
    if multiple > 1:  # the row is padded at its end, inside the last sequence, which the padding must not change
        assert batch["input_ids"].shape[1] % multiple == 0 and batch["pad_tokens"] > 0
    if packing:
        use_packed_attention(tiny)
    with torch.no_grad():
        sums, counts = sequence_log_probs(tiny, batch, chunked=chunked, chunk_rows=7)
    rows = [train_set[i] for i in range(4)]
    expected = [hand_log_probs(tiny, r[f"{s}_input_ids"], r[f"{s}_labels"]) for s in ("chosen", "rejected") for r in rows]
    tokens = [sum(1 for t in r[f"{s}_labels"][1:] if t != IGNORE_INDEX) for s in ("chosen", "rejected") for r in rows]
    assert sums.tolist() == pytest.approx(expected, abs=2e-3)
    assert counts.tolist() == tokens


def test_log_prob_gradients_match_full_logits(tmp_path, tokenizer, tiny):
    dpo = method(packing=False, fused_kernels=False)
    batch, _ = batch_of(tmp_path, tokenizer, dpo)
    weights = torch.linspace(-1, 1, 8)
    grads = []
    for chunked in (True, False):
        tiny.zero_grad()
        sums, _ = sequence_log_probs(tiny, batch, chunked=chunked, chunk_rows=5)
        (sums * weights).sum().backward()
        grads.append({n: p.grad.clone() for n, p in tiny.named_parameters() if p.grad is not None})
    tiny.zero_grad()
    for name in grads[1]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-3, atol=1e-5, msg=name)


# ----------------------------------------------------------------------------- losses


def test_losses_at_initialisation_by_hand():
    logps = torch.tensor([-12.0, -30.0]), torch.tensor([-20.0, -5.0])
    tokens = torch.tensor([4.0, 10.0]), torch.tensor([5.0, 2.0])
    values = {}
    for loss_type in ("sigmoid", "ipo", "hinge", "robust"):
        losses, chosen, rejected = preference_losses(*logps, *logps, *tokens, loss_type=loss_type, beta=0.1)  # policy == reference
        values[loss_type] = losses.tolist()
        assert chosen.tolist() == rejected.tolist() == [0.0, 0.0]
    assert values["sigmoid"] == pytest.approx([math.log(2)] * 2)
    assert values["robust"] == pytest.approx([math.log(2)] * 2)
    assert values["ipo"] == pytest.approx([(1 / (2 * 0.1)) ** 2] * 2)  # (0 - 1/(2β))²
    assert values["hinge"] == pytest.approx([1.0, 1.0])  # relu(1 - β·0)
    # SimPO: -log σ(β(mean_c - mean_r) - γ); ORPO: NLL(mean_c) - β log σ(log odds)
    simpo, _, _ = preference_losses(*logps, None, None, *tokens, loss_type="simpo", beta=2.0, simpo_gamma=0.5)
    mean_c, mean_r = -12.0 / 4, -20.0 / 5
    assert simpo[0].item() == pytest.approx(-math.log(1 / (1 + math.exp(-(2.0 * (mean_c - mean_r) - 0.5)))))
    orpo, _, _ = preference_losses(*logps, None, None, *tokens, loss_type="orpo", beta=0.1)
    odds = (mean_c - math.log(1 - math.exp(mean_c))) - (mean_r - math.log(1 - math.exp(mean_r)))
    assert orpo[0].item() == pytest.approx(-mean_c - 0.1 * math.log(1 / (1 + math.exp(-odds))), rel=1e-5)


def perturbed(model):
    import copy

    policy = copy.deepcopy(model)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return policy


def test_the_method_loss_at_initialisation_is_ln2_and_every_loss_type_differs(tmp_path, tokenizer, tiny):
    batch, _ = batch_of(tmp_path, tokenizer, method(packing=False))
    frozen = {"reference": tiny}
    dpo = method(packing=False, fused_kernels=False)
    with torch.no_grad():
        [with_ref] = dpo.before_step(tiny, frozen, [batch])
        result = dpo.loss(tiny, with_ref)
    assert result.units == 4 and result.loss.item() / 4 == pytest.approx(math.log(2), abs=1e-5)
    assert result.metrics["rewards/accuracy"].item() == 0  # equal rewards are not a win

    torch.manual_seed(3)
    policy = perturbed(tiny)
    values = {}
    for loss_type in LossType.__args__:
        dpo = method(packing=False, fused_kernels=False, loss_type=loss_type, label_smoothing=0.1)
        with torch.no_grad():
            [b] = dpo.before_step(policy, frozen, [batch])
            values[loss_type] = dpo.loss(policy, b).loss.item()
    assert len({round(v, 6) for v in values.values()}) == len(values), values  # ms-swift #10167: all were sigmoid
    with torch.no_grad():
        rpo = method(packing=False, fused_kernels=False, rpo_alpha=1.0)
        [b] = rpo.before_step(policy, frozen, [batch])
        assert rpo.loss(policy, b).loss.item() > method(packing=False, fused_kernels=False).loss(policy, b).loss.item()


# ----------------------------------------------------------------------------- training runs


def dpo_overrides(tmp_path, name, *extra):
    return [
        "method=lm_finetune/dpo", "modelpool=CausalLMPool/tiny-llama", f"data.path={pairs_file(tmp_path)}",
        "data.format=preference", f"data.cache_dir={tmp_path / 'cache'}", "method.max_length=128",
        "method.dataloader_kwargs.batch_size=4", "method.fix_token_embedding=false", "method.compile=false",
        f"output_dir={tmp_path / name}", "progress_bar=false", "fabric.precision=32-true", *extra,
    ]  # fmt: skip


def final_weights(result):
    return torch.load(result.final_checkpoint / "state.ckpt", weights_only=True)["model"]


SGD = ("method.optimizer._target_=torch.optim.SGD", "method.optimizer.lr=0.5", "method.optimizer.weight_decay=0",
       "~method.optimizer.fused", "method.lr_scheduler=null", "method.max_steps=2", "data.shuffle=false")  # fmt: skip


def test_accumulated_micro_batches_and_a_precomputed_reference_train_like_one_live_batch(tmp_path):
    one = train(compose_config(dpo_overrides(tmp_path, "one", *SGD, "method.dataloader_kwargs.batch_size=8")))
    accumulated = train(compose_config(dpo_overrides(tmp_path, "acc", *SGD, "method.accumulate_grad_batches=2")))
    precomputed = train(compose_config(dpo_overrides(tmp_path, "pre", *SGD, "method.dataloader_kwargs.batch_size=8",
                                                     "method.precompute_ref_log_probs=true")))  # fmt: skip
    a, b, c = final_weights(one), final_weights(accumulated), final_weights(precomputed)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6, msg=key)
        torch.testing.assert_close(c[key], a[key], rtol=1e-4, atol=1e-6, msg=key)
    assert one.state.global_step == accumulated.state.global_step == precomputed.state.global_step == 2
    assert list((tmp_path / "cache" / "reference-logps").glob("*.safetensors"))


def test_full_dpo_learns_the_preference_and_saves_a_transformers_folder(tmp_path):
    from transformers import AutoModelForCausalLM

    result = train(compose_config(dpo_overrides(
        tmp_path, "full", "data.val_fraction=0.25", "taskpool=reward_accuracy", "taskpool.every_n_steps=0",
        "method.optimizer.lr=3e-3", "method.lr_scheduler=null", "method.max_epochs=3", "method.save_ckpt_type=hf",
    )))  # fmt: skip
    first, last = result.evaluations[0], result.evaluations[max(result.evaluations)]
    assert first["val/loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert last["val/rewards/accuracy"] == 1.0 and last["val/loss"] < 0.2
    assert last["val/rewards/accuracy_ci95_low"] > 0.5 and last["val/pairs"] == 6
    assert result.loss_unit == "pair"
    model = AutoModelForCausalLM.from_pretrained(result.final_checkpoint)
    assert model.config.vocab_size > 0


def test_lora_dpo_keeps_no_second_copy_and_saves_a_peft_folder(tmp_path, tokenizer, tiny):
    from peft import PeftModel

    lora = "+method.peft_config={_target_:peft.LoraConfig,task_type:CAUSAL_LM,r:8,lora_alpha:16,target_modules:[q_proj,v_proj]}"
    cfg = compose_config(dpo_overrides(tmp_path, "lora", lora, "method.optimizer.lr=1e-2", "method.lr_scheduler=null",
                                       "method.max_steps=3", "method.save_ckpt_type=peft"))  # fmt: skip
    validate_config(cfg)
    from tunelab.config import instantiate

    dpo = instantiate(cfg.method)
    assert dpo.reference_kind() == "adapter_disabled"
    models = dpo.build_models(instantiate(cfg.modelpool), tokenizer)
    assert models.frozen == {}  # the reference is the same weights with the adapter switched off
    base_parameters = sum(p.numel() for n, p in models.trained.named_parameters() if "lora_" not in n)
    assert base_parameters == sum(p.numel() for p in instantiate(cfg.modelpool).load_model(len(tokenizer)).parameters())

    result = train(cfg)
    assert result.state.global_step == 3
    folder = result.final_checkpoint
    assert (folder / "adapter_config.json").exists() and (folder / "adapter_model.safetensors").exists()
    base = instantiate(cfg.modelpool).load_model(len(tokenizer))
    assert isinstance(PeftModel.from_pretrained(base, folder), PeftModel)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["data.format=prompt_completion"], "set data.format=preference"),
        (["method.reference=adapter_disabled"], "no adapter: set method.peft_config"),
        (["method.loss_type=simpo", "method.precompute_ref_log_probs=true"], "no reference model"),
        (["method.reference=none"], "compares the policy with a reference"),
        (["method.dataloader_kwargs.batch_size=5"], "batch_size=5 is odd"),
        (["method.save_ckpt_type=peft"], "there is no adapter"),
        (["method.pad_to_multiple_of=0"], r"method.pad_to_multiple_of=0 must be a whole number of tokens, 1 or more"),
    ],
)
def test_bad_options_name_what_to_change(tmp_path, extra, message):
    with pytest.raises(TunelabError, match=message):
        train(compose_config(dpo_overrides(tmp_path, "bad", *extra)))
    assert not (tmp_path / "bad" / "run.json").exists()


def test_unknown_loss_type_lists_the_valid_ones(tmp_path):
    with pytest.raises(TunelabError, match="method.loss_type.*'sigmoid', 'ipo', 'hinge', 'robust', 'simpo', 'orpo'"):
        validate_config(compose_config(dpo_overrides(tmp_path, "bad", "method.loss_type=dpop")))


def test_a_pair_without_rejected_names_the_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n" + json.dumps({"prompt": "a", "chosen": "b"}) + "\n")
    with pytest.raises(TunelabError, match=r"line 2.*no 'rejected'"):
        train(compose_config([*dpo_overrides(tmp_path, "bad"), f"data.path={path}"]))


def test_two_processes_match_one_with_the_double_batch(tmp_path):
    """DDP: the reference copy is set up on every rank without a DDP wrapper (DDP refuses frozen
    modules), pairs are weighted across ranks, and two processes follow one."""
    import csv
    import subprocess
    import sys

    def cli(name, *extra):
        args = [a for a in dpo_overrides(tmp_path, name, *SGD, "method.max_steps=3", *extra) if "progress_bar" not in a]
        done = subprocess.run([sys.executable, "-m", "tunelab", "train", *args, "progress_bar=false", "fabric.accelerator=cpu"],
                              capture_output=True, text=True, timeout=600)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        with (tmp_path / name / "metrics.csv").open() as f:
            return [float(row["train/loss"]) for row in csv.DictReader(f)]

    single = cli("single", "method.dataloader_kwargs.batch_size=8")
    ddp = cli("ddp", "fabric=ddp", "fabric.devices=2", "method.dataloader_kwargs.batch_size=4")
    assert len(ddp) == 3 and ddp == pytest.approx(single, rel=1e-4)
    assert single[0] == pytest.approx(math.log(2), abs=1e-5)
