"""Generation, perplexity and base-vs-tuned comparison on a tiny random Llama."""

import json
import math

import pytest
import torch

from tunelab.errors import TunelabError
from tunelab.evaluation.compare import compare_models, forgetting_verdict, perplexity_ratio
from tunelab.evaluation.generate import GenerationSettings, evaluate_generation
from tunelab.evaluation.items import load_items
from tunelab.evaluation.models import load_eval_model
from tunelab.evaluation.perplexity import perplexity, windows

PROBLEMS = [
    {"question": "Tom has 3 apples and buys 4 more. How many apples does he have?", "answer": "3 + 4 = <<3+4=7>>7\n#### 7"},
    {"question": "A book costs $12. How much do 5 books cost?", "answer": "12 * 5 = <<12*5=60>>60\n#### 60"},
    {"question": "Sara ran 2 miles a day for a week. How far did she run?", "answer": "2 * 7 = <<2*7=14>>14\n#### 14"},
]


@pytest.fixture
def gsm_file(tmp_path):
    path = tmp_path / "gsm.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS))
    return path


@pytest.fixture
def model(tiny_base_model):
    return load_eval_model(str(tiny_base_model), device="cpu")


def test_items_take_the_question_as_prompt_and_the_answer_as_reference(gsm_file):
    items = load_items(str(gsm_file), start=1, limit=2)
    assert [i.id for i in items] == [1, 2]
    assert items[0].prompt == [{"role": "user", "content": PROBLEMS[1]["question"]}]
    assert items[0].reference == PROBLEMS[1]["answer"] and items[0].messages[-1]["content"] == PROBLEMS[1]["answer"]


def test_perplexity_is_exp_of_the_mean_loss_on_the_answer_tokens(model, gsm_file):
    from tunelab.data import tokenize_conversation

    items = load_items(str(gsm_file))
    report = perplexity(model, items, batch_size=2)
    nll, count = 0.0, 0
    for item in items:  # by hand: one sequence at a time, no padding
        ids, labels = tokenize_conversation(model.tokenizer, item.messages)
        with torch.no_grad():
            logits = model.model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
        targets = torch.tensor(labels[1:])
        keep = targets != -100
        nll += torch.nn.functional.cross_entropy(logits[keep], targets[keep], reduction="sum").item()
        count += int(keep.sum())
    assert report.tokens == count
    assert report.perplexity == pytest.approx(math.exp(nll / count), rel=1e-4)
    assert sum(i["tokens"] for i in report.per_item) == count


def test_rolling_windows_score_every_token_once():
    ids = list(range(100, 150))
    cut = windows(ids, ids, max_length=16, stride=8)
    scored = [t for w_ids, w_labels in cut for t in w_labels[1:] if t != -100]  # a window's first label is never predicted
    assert sorted(scored) == ids[1:]
    assert all(len(w) <= 16 for w, _ in cut)


def test_long_text_perplexity_in_windows_is_close_to_the_full_pass(model, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"word{i}" for i in range(120)))
    items = load_items(str(text))
    full = perplexity(model, items, max_length=2048)
    windowed = perplexity(model, items, max_length=64, stride=32)
    assert windowed.windows > 1 and windowed.tokens == full.tokens
    assert windowed.perplexity == pytest.approx(full.perplexity, rel=0.05)  # less context per token, same tokens


def test_generation_equals_transformers_greedy_generate(model, gsm_file):
    items = load_items(str(gsm_file))
    ours = model.generate([i.prompt for i in items], max_new_tokens=12, batch_size=2)
    tok = model.tokenizer
    for item, generated in zip(items, ours):
        inputs = tok(model.render(item.prompt), return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            out = model.model.generate(**inputs, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=model.eos_token_ids)
        new = out[0, inputs["input_ids"].shape[1]:].tolist()
        if any(t in model.eos_token_ids for t in new):
            new = new[: [t in model.eos_token_ids for t in new].index(True)]
        assert generated.text == tok.decode(new, skip_special_tokens=True).strip()


def test_evaluate_generation_writes_predictions_beside_the_scores(model, gsm_file, tmp_path):
    items = load_items(str(gsm_file))
    report = evaluate_generation(model, items, ["gsm8k", "rouge"], GenerationSettings(max_new_tokens=8, batch_size=2), "gsm", tmp_path / "out")
    rows = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [0, 1, 2] and rows[0]["reference"] == PROBLEMS[0]["answer"]
    assert set(rows[0]["scores"]) == {"gsm8k", "rouge1", "rouge2", "rougeL"}
    saved = json.loads((tmp_path / "out" / "scores.json").read_text())
    assert saved["scores"]["rouge1"]["score"] == pytest.approx(sum(r["scores"]["rouge1"] for r in rows) / 3)
    assert saved["generated_tokens"] == sum(r["tokens"] for r in rows) == report.generated_tokens


def test_the_loop_guard_stops_a_cycling_answer_and_flags_it(model, gsm_file, tmp_path):
    """A tiny random model's greedy answers cycle; with the guard each looping answer ends early,
    is cut after its span's first copy, and is flagged, and the rest come out as without it."""
    from tunelab.models.sampling import LoopGuard

    items = load_items(str(gsm_file))
    prompts = [i.prompt for i in items]
    free = model.generate(prompts, max_new_tokens=120, batch_size=3)
    guarded = model.generate(prompts, max_new_tokens=120, batch_size=3, stop_loops=True)
    tok = model.tokenizer
    guard = LoopGuard(tok)
    assert sorted(tok.decode([t]).strip() for t in guard.digits if len(tok.decode([t]).strip()) == 1) == list("0123456789")
    looping = [guard.start(tok(g.text, add_special_tokens=False)["input_ids"]) is not None and not g.ended for g in free]
    assert any(looping), "a random tiny model's greedy answers cycle"
    for plain, stopped, loops in zip(free, guarded, looping):
        assert not plain.looped
        if stopped.looped:
            assert not stopped.ended and stopped.tokens < 120 and plain.text.startswith(stopped.text) and len(stopped.text) < len(plain.text)
        else:
            assert stopped == plain
    assert sum(g.looped for g in guarded) >= 1
    report = evaluate_generation(model, items, ["gsm8k"], GenerationSettings(max_new_tokens=120, batch_size=3, stop_loops=True), "gsm", tmp_path / "out")
    rows = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert [r["looped"] for r in rows] == [g.looped for g in guarded] == [r["looped"] for r in report.rows]


def test_run_folder_and_adapter_load_as_models(tiny_base_model, tmp_path, gsm_file):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_base_model)
    lora = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora.save_pretrained(tmp_path / "adapter")
    with_adapter = load_eval_model(str(tiny_base_model), adapter=str(tmp_path / "adapter"))
    plain = load_eval_model(str(tiny_base_model))
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert not torch.allclose(with_adapter.model(input_ids=ids).logits, plain.model(input_ids=ids).logits)
        assert torch.allclose(with_adapter.model(input_ids=ids).logits, lora.eval()(input_ids=ids).logits, atol=1e-5)
    # a run folder: summary.json names the final checkpoint
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    checkpoint = run / "checkpoints" / "step-000001"
    AutoModelForCausalLM.from_pretrained(tiny_base_model).save_pretrained(checkpoint)  # (get_peft_model changed `base` in place)
    (run / "summary.json").write_text(json.dumps({"final_checkpoint": str(checkpoint)}))
    from_run = load_eval_model(str(run), tokenizer=str(tiny_base_model))
    with torch.no_grad():
        assert torch.allclose(from_run.model(input_ids=ids).logits, plain.model(input_ids=ids).logits)


def test_bad_models_get_clear_errors(tmp_path):
    with pytest.raises(TunelabError, match="does not exist.*model folder.*gguf.*run folder.*endpoint"):
        load_eval_model(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(TunelabError, match="neither a Hugging Face model folder"):
        load_eval_model(str(tmp_path / "empty"))
    lightning = tmp_path / "run" / "checkpoints" / "step-000002"  # save_ckpt_type=lightning: only train resumes from it
    lightning.mkdir(parents=True)
    (lightning / "state.ckpt").write_bytes(b"")
    (lightning.parent / "latest").write_text("step-000002\n")
    with pytest.raises(TunelabError, match="in Lightning's format.*method.save_ckpt_type=hf"):
        load_eval_model(str(tmp_path / "run"))
    with pytest.raises(TunelabError, match="no OpenAI-compatible server answers"):
        load_eval_model("http://127.0.0.1:9/v1")


def test_compare_writes_a_report_and_finds_no_forgetting_against_itself(tiny_base_model, gsm_file, tmp_path):
    items = load_items(str(gsm_file))
    general = {"general.txt": load_items("pkg://tunelab/demo_data/general_text.txt", limit=5)}

    def load():
        return load_eval_model(str(tiny_base_model))

    report = compare_models(load, load, items, ["gsm8k", "rouge"], GenerationSettings(max_new_tokens=8), general, "gsm", tmp_path / "cmp")
    assert all(m["diff"] == 0 for m in report.metrics)
    assert [p["role"] for p in report.perplexity] == ["task", "general"]
    assert all(p["ratio"] == pytest.approx(1.0) for p in report.perplexity)
    assert report.forgetting.startswith("none measured")
    page = (tmp_path / "cmp" / "report.html").read_text()
    assert "metrics.png" in page and "perplexity.png" in page and "Forgetting" in page
    assert PROBLEMS[0]["question"] in page  # samples side by side
    for name in ("metrics.png", "perplexity.png", "report.json", "base/predictions.jsonl", "tuned/predictions.jsonl"):
        assert (tmp_path / "cmp" / name).is_file()


def test_forgetting_verdict_needs_a_significant_rise():
    from types import SimpleNamespace

    def report(nll):
        per = [{"nll": n, "tokens": 10} for n in nll]
        return SimpleNamespace(per_item=per, mean_nll=sum(nll) / (10 * len(nll)))

    base = report([20.0, 22.0, 19.0, 21.0])
    worse = report([25.0, 27.0, 24.0, 26.0])  # every item 5 nats worse: perplexity x e^0.5
    ratio = perplexity_ratio(base, worse)
    assert ratio["ratio"] == pytest.approx(math.exp(0.5)) and ratio["ci95_low"] > 1
    verdict = forgetting_verdict([{"set": "general.txt", "role": "general", **ratio}])
    assert verdict.startswith("yes") and "general.txt" in verdict
    assert forgetting_verdict([]).startswith("not measured")
