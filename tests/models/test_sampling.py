"""tunelab's decoding loop against transformers' generate, its reference."""

import pytest
import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, MistralConfig
from transformers.cache_utils import DynamicCache
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from tunelab.models import sampling
from tunelab.models.sampling import draw, filter_logits, reserved_cache, sample

PAD = 0


def tiny_llama(vocab: int = 48) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, tie_word_embeddings=True, pad_token_id=PAD)  # fmt: skip
    return LlamaForCausalLM(config).eval()


def left_padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([[PAD] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


PROMPTS = [[5, 9, 13, 2, 7], [11, 3], [4, 4, 8, 30]]


def hf_greedy(model, ids, mask, new_tokens: int, eos: int | None) -> torch.Tensor:
    config = GenerationConfig(do_sample=False, max_new_tokens=new_tokens, pad_token_id=PAD, eos_token_id=eos)
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, generation_config=config)[:, ids.shape[1] :]


def test_greedy_completions_are_transformers_generate_token_for_token_with_padding_repeats_and_eos():
    model = tiny_llama()
    ids, mask = left_padded(PROMPTS)
    free = hf_greedy(model, ids, mask, 12, eos=None)
    eos = int(free[0, 3])  # a token the first row reaches at its 4th step: that row ends there
    reference = hf_greedy(model, ids.repeat_interleave(2, 0), mask.repeat_interleave(2, 0), 12, eos=eos)
    ours = sample(model, ids, mask, 12, eos, PAD, greedy=True, repeats=2)
    assert torch.equal(ours, reference[:, : ours.shape[1]])
    assert (reference[:, ours.shape[1] :] == PAD).all()  # generate only ran on after every row had ended
    end = int((ours[0] == eos).nonzero()[0])
    assert end <= 3 and (ours[0, end + 1 :] == PAD).all()


def test_each_prompt_completes_the_same_alone_and_left_padded_in_a_batch():
    model = tiny_llama()
    ids, mask = left_padded(PROMPTS)
    batched = sample(model, ids, mask, 8, None, PAD, greedy=True)
    for i, prompt in enumerate(PROMPTS):
        alone = sample(model, torch.tensor([prompt]), torch.ones(1, len(prompt), dtype=torch.long), 8, None, PAD, greedy=True)
        assert torch.equal(batched[i], alone[0])


def test_the_models_own_forward_gives_the_same_tokens_when_the_head_is_not_known_to_be_plain(monkeypatch):
    model = tiny_llama()
    ids, mask = left_padded(PROMPTS)
    fast = sample(model, ids, mask, 8, None, PAD, greedy=True)
    monkeypatch.setattr(sampling, "PLAIN_HEAD_MODEL_TYPES", set())
    assert sampling._Decoder(model).decoder is None
    assert torch.equal(sample(model, ids, mask, 8, None, PAD, greedy=True), fast)


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (5, 1.0), (0, 0.7), (7, 0.5), (0, 0.05)])
def test_top_k_and_top_p_keep_what_transformers_warpers_keep(top_k, top_p):
    torch.manual_seed(1)
    logits = torch.randn(6, 40) * 3
    expected = logits
    if top_k:
        expected = TopKLogitsWarper(top_k)(None, expected)
    if top_p < 1:
        expected = TopPLogitsWarper(top_p)(None, expected)
    ours = filter_logits(logits, top_k, top_p)
    assert torch.equal(torch.isinf(ours), torch.isinf(expected))
    assert torch.equal(ours[~torch.isinf(ours)], logits[~torch.isinf(ours)])
    assert (~torch.isinf(ours)).sum(-1).min() >= 1


def test_draws_follow_the_weights_and_never_take_a_zero_weight_entry():
    probs = torch.tensor([0.0, 0.5, 0.2, 0.0, 0.3, 0.0, 0.0]).expand(40_000, -1)
    counts = torch.bincount(draw(probs, torch.Generator().manual_seed(0)), minlength=7).float() / 40_000
    assert counts[[0, 3, 5, 6]].sum() == 0
    assert torch.allclose(counts, probs[0], atol=0.012)  # about 5 standard errors


def test_sampled_first_tokens_follow_the_tempered_filtered_distribution():
    model = tiny_llama(vocab=24)
    prompt = torch.tensor([[5, 9, 13]])
    with torch.no_grad():
        logits = model(prompt).logits[0, -1]
    expected = torch.softmax(filter_logits(logits[None] / 0.7, top_k=10, top_p=0.9), -1)[0]
    first = sample(model, prompt, torch.ones_like(prompt), 1, None, PAD, temperature=0.7, top_k=10, top_p=0.9, repeats=20_000,
                   generator=torch.Generator().manual_seed(0))[:, 0]  # fmt: skip
    counts = torch.bincount(first, minlength=24).float() / first.numel()
    assert counts[expected == 0].sum() == 0
    assert torch.allclose(counts, expected, atol=0.015)


def test_the_same_seed_samples_the_same_completions_and_another_seed_others():
    model = tiny_llama()
    ids, mask = left_padded(PROMPTS)

    def run(seed):
        return sample(model, ids, mask, 10, None, PAD, repeats=3, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(4), run(4))
    assert not torch.equal(run(4), run(5))


def test_the_reserved_cache_is_only_used_where_every_layer_sees_the_whole_sequence():
    cache = reserved_cache(tiny_llama().config, 16)
    assert all(isinstance(layer, sampling.ReservedLayer) for layer in cache.layers)
    windowed = MistralConfig(vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, sliding_window=8)  # fmt: skip
    assert type(reserved_cache(windowed, 16)) is DynamicCache


def test_the_reserved_cache_refuses_to_write_past_its_end():
    layer = sampling.ReservedLayer(capacity=4)
    layer.update(torch.zeros(1, 2, 3, 8), torch.zeros(1, 2, 3, 8))
    layer.update(torch.ones(1, 2, 1, 8), torch.ones(1, 2, 1, 8))
    assert layer.get_seq_length() == 4 and layer.keys[0, 0, 3].eq(1).all()
    with pytest.raises(RuntimeError, match="holds 4 positions"):
        layer.update(torch.zeros(1, 2, 1, 8), torch.zeros(1, 2, 1, 8))


def test_the_loop_guard_knows_a_degenerate_loop_from_numbers_and_a_short_refrain():
    from tunelab.models.sampling import LoopGuard

    guard = LoopGuard()
    guard.digits = set(range(10))  # tokens 0-9 are the digits
    loop = [17, 18, 19] + [20, 21, 22, 23, 24, 25] * 7  # "= 150 / 2 = 150 / 2 = ...": a 6-token span, 42 tokens of it
    assert guard.start(loop) == 3 + 6  # the first copy of the span stays
    assert guard.start([5 + 20] * 40) == 1
    number = [17, 1, 40, 0, 0, 0, 40, 0, 0, 0, 40, 0, 0, 0, 40, 0, 0, 0, 41]  # "1,000,000,000,000.": digits run together
    assert guard.start(number) is None
    # a line that comes back with new numbers: "After the 9th turn, it travels 34 meters." ... the 10th, 11th, ...
    lines = []
    for turn in range(9, 15):
        lines += [30, 31] + [int(d) for d in str(turn)] + [32, 33, 34, 35] + [int(d) for d in str(2 * turn + 16)] + [36, 37, 38, 39, 42, 43]
    start = guard.start([17, 18] + lines)
    assert start is not None and start == 2 + len([30, 31, 9, 32, 33, 34, 35, 3, 4, 36, 37, 38, 39, 42, 43])  # after the first line
    refrain = [20, 21, 22, 23] * 3 + list(range(44, 80))  # a phrase three times, then on
    assert guard.start(refrain) is None and LoopGuard().start(lines) is None  # without digits the numbers differ: no loop
    rows = torch.tensor([loop, [44 + i for i in range(len(loop))], loop])
    assert guard.looping(rows, torch.tensor([False, False, True])).tolist() == [True, False, False]  # a finished row is left alone


def test_stop_loops_ends_a_looping_greedy_row_where_the_guard_sees_it_and_leaves_others_alone():
    from tunelab.models.sampling import LoopGuard

    model = tiny_llama()
    ids, mask = left_padded(PROMPTS)
    guard = LoopGuard()
    free = sample(model, ids, mask, 96, None, PAD, greedy=True)
    guarded = sample(model, ids, mask, 96, None, PAD, greedy=True, loop_guard=guard)
    assert any(guard.start(row.tolist()) is not None for row in free), "a random tiny model's greedy completions cycle"
    for row, free_row in zip(guarded, free):
        kept = row.tolist()
        cut = next((k for k, t in enumerate(kept) if t == PAD), len(kept))
        assert kept[:cut] == free_row.tolist()[:cut]  # the guard only ends rows early
        if cut < len(kept):  # stopped: the tail it kept loops, and it stopped within one check of seeing it
            assert guard.start(kept[:cut]) is not None and guard.start(kept[: cut - guard.check_every]) is None
