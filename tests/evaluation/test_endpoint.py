"""Evaluating an OpenAI-compatible endpoint through the official openai client, against a small
stand-in server (the real one is `tunelab serve`)."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

pytest.importorskip("openai")

from tunelab.evaluation.generate import GenerationSettings, evaluate_generation  # noqa: E402
from tunelab.evaluation.items import EvalItem  # noqa: E402
from tunelab.evaluation.models import load_eval_model  # noqa: E402
from tunelab.evaluation.perplexity import perplexity  # noqa: E402


class Handler(BaseHTTPRequestHandler):
    seen: list = []

    def log_message(self, *args):
        pass

    def _send(self, body: dict, status: int = 200):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._send({"object": "list", "data": [{"id": "tiny", "object": "model", "created": 0, "owned_by": "test"}]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Handler.seen.append((self.path, body))
        usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
        if self.path.endswith("/chat/completions"):
            question = body["messages"][-1]["content"]
            answer = "#### 7" if "3 + 4" in question else "#### 0"
            self._send({"id": "c", "object": "chat.completion", "created": 0, "model": body["model"], "usage": usage,
                        "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": answer}}]})  # fmt: skip
            return
        words = body["prompt"].split(" ")  # echo: one "token" per word, each with log-probability -1 (the first has none)
        offsets = [sum(len(w) + 1 for w in words[:k]) for k in range(len(words))]
        logprobs = {"tokens": words, "token_logprobs": [None] + [-1.0] * (len(words) - 1), "text_offset": offsets, "top_logprobs": None}
        self._send({"id": "t", "object": "text_completion", "created": 0, "model": body["model"], "usage": usage,
                    "choices": [{"index": 0, "finish_reason": "length", "text": body["prompt"], "logprobs": logprobs}]})  # fmt: skip


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()


def test_generation_through_an_endpoint(server):
    model = load_eval_model(server)
    assert model.name.endswith("#tiny")
    items = [EvalItem(0, [{"role": "user", "content": "What is 3 + 4?"}], "#### 7"), EvalItem(1, [{"role": "user", "content": "What is 1 + 1?"}], "#### 2")]
    report = evaluate_generation(model, items, ["gsm8k"], GenerationSettings(max_new_tokens=5))
    assert report.scores["gsm8k"]["score"] == 0.5 and report.generated_tokens == 4
    path, body = Handler.seen[-1]
    assert body["max_tokens"] == 5 and body["temperature"] == 0.0 and body["model"] == "tiny"


def test_text_perplexity_through_echoed_logprobs(server):
    model = load_eval_model(server + "#tiny")
    report = perplexity(model, [EvalItem(0, "one two three four", None)])
    assert report.tokens == 3 and report.mean_nll == pytest.approx(1.0)
    _, body = Handler.seen[-1]
    assert body["echo"] is True and body["max_tokens"] == 0


def test_an_adapter_cannot_be_put_on_an_endpoint(server):
    from tunelab.errors import TunelabError

    with pytest.raises(TunelabError, match="URL#NAME"):
        load_eval_model(server, adapter="some/adapter")
