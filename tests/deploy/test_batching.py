"""The server's running batch: rows that join and leave between steps decode what they decode
alone, greedy, with every cache regrouping (joining at different times, shorter and longer
prompts than the rows there, rows ending early)."""

import pytest
import torch


class Row:
    """A request as the running batch sees it (the server's Job without its event loop)."""

    def __init__(self, prompt, max_tokens):
        self.prompt, self.max_tokens, self.tokens, self.finish, self.events = prompt, max_tokens, [], None, []

    def send(self, event):
        self.events.append(event)


@pytest.fixture(scope="module")
def model(tiny_base_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_base_model).eval()


def alone(model, prompt, max_tokens):
    from tunelab.models.sampling import sample

    ids = torch.tensor([prompt])
    return [t for t in sample(model, ids, torch.ones_like(ids), max_tokens, [], 0, greedy=True)[0].tolist()]


def test_rows_joining_and_leaving_decode_what_each_decodes_alone(model):
    from tunelab.deploy.batching import RunningBatch, supports_running_batches

    assert supports_running_batches(model)
    torch.manual_seed(1)
    prompts = [torch.randint(5, 1000, (n,)).tolist() for n in (7, 3, 12, 5, 9, 2)]
    limits = [9, 4, 6, 12, 3, 7]
    rows = [Row(p, m) for p, m in zip(prompts, limits)]
    batch = RunningBatch(model, eos_ids=[], pad_id=0, temperature=0.0, top_p=1.0)
    joins = {0: [rows[0], rows[1]], 2: [rows[2]], 3: [rows[3], rows[4]], 8: [rows[5]]}  # step -> rows joining before it
    widths, ended = [], []
    with torch.no_grad():
        for step in range(40):
            if step in joins:
                batch.join(joins[step])
            if batch.rows:
                widths.append(batch.mask.shape[1])
                ended += batch.step()
    assert sorted(id(r) for r in ended) == sorted(id(r) for r in rows) and not batch.rows
    for row, prompt, limit in zip(rows, prompts, limits):
        assert row.tokens == alone(model, prompt, limit) and row.finish == "length"
        assert [e for e in row.events if e[0] == "token"] == [("token", t) for t in row.tokens] and row.events[-1] == ("done", "length")
    assert min(widths[-3:]) < max(widths)  # the columns only ended rows needed went with them


def test_an_end_of_sequence_token_ends_a_row_and_is_not_sent(model):
    from tunelab.deploy.batching import RunningBatch

    prompt = [11, 12, 13, 14]
    reference = alone(model, prompt, 6)
    row = Row(prompt, 6)
    batch = RunningBatch(model, eos_ids=[reference[2]], pad_id=0, temperature=0.0, top_p=1.0)
    with torch.no_grad():
        batch.join([row])
        while batch.rows:
            batch.step()
    assert row.tokens == reference[: reference.index(reference[2])] and row.finish == "stop"


def test_an_ended_row_stays_in_the_block_until_the_next_join_or_until_half_have_ended(model):
    from tunelab.deploy.batching import RunningBatch

    rows = [Row([20 + k, 30 + k, 40 + k], limit) for k, limit in enumerate((2, 8, 8, 8))]
    batch = RunningBatch(model, eos_ids=[], pad_id=0, temperature=0.0, top_p=1.0)
    with torch.no_grad():
        batch.join(rows)
        batch.step(), batch.step()
        assert rows[0].finish == "length" and len(batch.block) == 4 and batch.rows == rows[1:]  # still in the cache
        late = Row([7, 8, 9, 10, 11], 3)
        batch.join([late])
        assert batch.block == rows[1:] + [late] and batch.cache.layers[0].keys.shape[0] == 4  # replaced at the join
        while batch.rows:
            batch.step()
    assert late.tokens == alone(model, late.prompt, 3) and all(r.tokens == alone(model, r.prompt, r.max_tokens) for r in rows)
