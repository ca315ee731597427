"""Rows with different adapters in one forward pass: tunelab's stacked LoRA and peft's mixed
batches against each row run alone, directly and through the server's running batch."""

import pytest
import torch


@pytest.fixture(scope="module")
def adapters(tiny_base_model, tmp_path_factory):
    """Two LoRA adapters with different ranks, target layers and scalings (one rank-stabilised)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("mixed-adapters")
    configs = {"x": LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False),
               "y": LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "k_proj", "o_proj", "gate_proj", "up_proj"], use_rslora=True,
                               init_lora_weights=False)}  # fmt: skip
    for seed, (name, config) in enumerate(configs.items()):
        torch.manual_seed(seed)
        get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_base_model), config).save_pretrained(folder / name)
    return {name: folder / name for name in configs}


def loaded(tiny_base_model, adapters):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base_model), str(adapters["x"]), adapter_name="x").eval()
    model.load_adapter(str(adapters["y"]), adapter_name="y")
    return model


def test_stacked_lora_gives_each_row_its_own_adapter(tiny_base_model, adapters):
    from tunelab.deploy.mixed_lora import StackedLoRA, stackable

    model = loaded(tiny_base_model, adapters)
    torch.manual_seed(0)
    ids = torch.randint(5, 1000, (4, 9))
    rows = ["x", None, "y", "x"]
    with torch.no_grad():
        alone = []
        for r, name in enumerate(rows):
            if name is None:
                with model.disable_adapter():
                    alone.append(model(input_ids=ids[r : r + 1]).logits[0])
            else:
                model.set_adapter(name)
                alone.append(model(input_ids=ids[r : r + 1]).logits[0])
        alone = torch.stack(alone)
        assert stackable(model, ["x", "y"])
        with model.disable_adapter(), StackedLoRA(model, ["x", "y"]) as stacked:
            stacked.set_rows(rows)
            mixed = model(input_ids=ids).logits
        peft_mixed = model(input_ids=ids, adapter_names=["__base__" if n is None else n for n in rows]).logits
        after = model(input_ids=ids[:1]).logits[0]  # the hooks are gone: the active adapter again
    assert torch.allclose(mixed, alone, atol=1e-5) and torch.allclose(peft_mixed, alone, atol=1e-5)
    assert (alone[0] - alone[1]).abs().max() > 1e-2 and (alone[2] - alone[1]).abs().max() > 1e-2  # the adapters do change the rows
    model.set_adapter("x")
    assert torch.allclose(model(input_ids=ids[:1]).logits[0], alone[0], atol=1e-5) and after.shape == alone[0].shape


def test_dora_is_not_stackable(tiny_base_model, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tunelab.deploy.mixed_lora import stackable

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_base_model), LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    assert not stackable(model, ["default"])


@pytest.mark.parametrize("mixed_lora", ["stacked", "peft"])
def test_the_servers_running_batch_decodes_each_row_as_alone_with_either_mixer(tiny_base_model, adapters, mixed_lora):
    from tunelab.deploy.batching import RunningBatch
    from tunelab.deploy.server import ModelServer
    from tunelab.evaluation.models import load_eval_model
    from tunelab.models.sampling import sample

    server = ModelServer(load_eval_model(str(tiny_base_model), device="cpu"), {k: str(v) for k, v in adapters.items()}, name="tiny",
                         mixed_lora=mixed_lora)  # fmt: skip

    class Row:
        def __init__(self, model, prompt, max_tokens):
            self.model, self.prompt, self.max_tokens, self.tokens, self.finish = model, prompt, max_tokens, [], None

        def send(self, event):
            pass

    torch.manual_seed(2)
    rows = [Row(m, torch.randint(5, 1000, (n,)).tolist(), k) for m, n, k in (("x", 6, 8), ("tiny", 4, 5), ("y", 9, 7), ("y", 3, 6))]
    with server.lock, torch.no_grad():
        batch = RunningBatch(server.base, [], 0, 0.0, 1.0, server._prepare_rows)
        batch.join(rows[:2])
        batch.step()
        batch.join(rows[2:])  # a second adapter joins a batch that is decoding
        while batch.rows:
            batch.step()
        assert server.setup_key[:2] == ("mixed", mixed_lora)
        server._release_setup()
        for row in rows:
            model, context = server._model_for(row.model)
            ids = torch.tensor([row.prompt])
            with context:
                assert row.tokens == sample(model, ids, torch.ones_like(ids), row.max_tokens, [], 0, greedy=True)[0].tolist()
