"""llama.cpp in this process, through the ``xllamacpp`` binding (``pip install xllamacpp``: prebuilt
CPU wheels), as one side of an export's verification.

llama.cpp's server returns log-probabilities of generated tokens only, never of a given text, so
the logits of a text are formed from what it does return for every position: the final hidden
states (its embedding endpoint, no pooling), times the GGUF's own output head (dequantized).
Before the first text is scored, that construction is checked against llama.cpp's own choice of
the next token. Greedy continuations and chat answers come from its completion endpoints. The
server it runs listens on 127.0.0.1 only, on a free port, for as long as the scorer lives.
"""

import json
import logging
import os
import urllib.request
from pathlib import Path

import numpy as np
import torch

from tunelab.errors import TunelabError

log = logging.getLogger(__name__)


def available() -> str | None:
    """None when the binding imports, else why not (for messages and test skips)."""
    import importlib

    try:
        importlib.import_module("xllamacpp")
    except ImportError as error:
        return f"the llama.cpp binding is not installed (pip install xllamacpp): {error}"
    return None


class LlamaCppScorer:
    """A GGUF model (and optionally a GGUF LoRA adapter on it) loaded by llama.cpp."""

    def __init__(self, gguf_file: str | Path, adapter: str | Path | None = None, context: int = 4096, threads: int | None = None, name: str | None = None):
        why = available()
        if why:
            raise TunelabError(f"Verifying with llama.cpp needs {why}.")
        import xllamacpp

        from tunelab.deploy.gguf import output_head

        self.name = name or str(gguf_file)
        params = xllamacpp.CommonParams()
        params.model.path = str(gguf_file)
        params.n_ctx = context
        params.n_batch = params.n_ubatch = context  # a whole text in one batch: its hidden states come back together
        params.n_parallel = 1
        params.cpuparams.n_threads = params.cpuparams_batch.n_threads = threads or max(1, os.cpu_count() or 1)
        params.embedding = True
        params.pooling_type = xllamacpp.llama_pooling_type.LLAMA_POOLING_TYPE_NONE
        params.verbosity = -1
        # The key/value cache in float32 and attention without flash (whose CPU path works in float16):
        # llama.cpp's defaults, kept for serving, cost an f32 file about 0.04 in SmolLM2's logits.
        params.cache_type_k = params.cache_type_v = xllamacpp.ggml_type.GGML_TYPE_F32
        params.flash_attn_type = xllamacpp.llama_flash_attn_type.LLAMA_FLASH_ATTN_TYPE_DISABLED
        params.hostnames = ["127.0.0.1"]
        if adapter is not None:
            lora = xllamacpp.CommonAdapterLoraInfo()
            lora.path, lora.scale = str(adapter), 1.0
            params.lora_adapters = [lora]
        try:
            self.server = xllamacpp.Server(params)
        except Exception as error:  # noqa: BLE001 - llama.cpp's own message says what it could not load
            raise TunelabError(f"llama.cpp could not load '{gguf_file}'{f' with adapter {adapter}' if adapter else ''}: {error}") from None
        self.address = self.server.listening_address.rstrip("/")
        self.head = torch.from_numpy(output_head(Path(gguf_file)))
        self._checked = False

    def _post(self, path: str, body: dict):
        request = urllib.request.Request(self.address + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=600) as response:
            return json.loads(response.read())

    def hidden_states(self, ids: list[int]) -> torch.Tensor:
        out = self._post("/embedding", {"content": ids})
        rows = out[0]["embedding"]
        if len(rows) != len(ids):
            raise TunelabError(f"llama.cpp returned {len(rows)} hidden states for {len(ids)} tokens.")
        return torch.tensor(np.asarray(rows, dtype=np.float32))

    def logits(self, ids: list[int]) -> torch.Tensor:
        logits = self.hidden_states(ids) @ self.head.T
        if not self._checked:
            self._check_head(ids, logits[-1])
        return logits

    def _check_head(self, ids: list[int], last: torch.Tensor) -> None:
        """The hidden states times the head must give llama.cpp's own next-token choice."""
        choice = self.completion_ids(ids, 1)
        if choice and int(last.argmax()) != choice[0] and float(last.max() - last[choice[0]]) > 1e-3 * float(last.abs().max()):
            raise TunelabError(
                f"llama.cpp's hidden states times the GGUF's head pick token {int(last.argmax())}, llama.cpp itself {choice[0]}: "
                "the logits cannot be reconstructed, so this GGUF cannot be verified here."
            )
        self._checked = True

    def completion_ids(self, ids: list[int], max_new_tokens: int) -> list[int]:
        result = self.server.handle_completions(
            {"prompt": ids, "max_tokens": max_new_tokens, "temperature": 0.0, "n_probs": 1, "cache_prompt": False}
        )
        if "error" in result:
            raise TunelabError(f"llama.cpp completion failed: {result['error'].get('message', result['error'])}")
        content = (result["choices"][0].get("logprobs") or {}).get("content") or []
        return [int(token["id"]) for token in content]

    def greedy(self, ids: list[int], max_new_tokens: int) -> list[int]:
        return self.completion_ids(ids, max_new_tokens)

    def tokenize(self, text: str) -> list[int]:
        return [int(t) for t in self._post("/tokenize", {"content": text, "add_special": False, "parse_special": True})["tokens"]]

    def chat(self, messages: list[dict], max_tokens: int = 256) -> str:
        """An answer through the GGUF's own chat template (llama.cpp applies it), greedy."""
        result = self.server.handle_chat_completions({"messages": messages, "max_tokens": max_tokens, "temperature": 0.0})
        if "error" in result:
            raise TunelabError(f"llama.cpp chat completion failed: {result['error'].get('message', result['error'])}")
        return result["choices"][0]["message"]["content"]
