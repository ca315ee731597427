import contextlib
import json
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import SMOLLM2_GGUF, TINY_LLAMA, shared_data
from tunelab.config.schema import DataConfig
from tunelab.data.formats import to_example
from tunelab.data.readers import Record
from tunelab.data.synth import EndpointClient, LocalModelClient, Similarity, augment, parse_example, parse_paraphrase, synthesize
from tunelab.errors import TunelabError

SEEDS = [
    ("Give three tips for staying healthy.", "", "Eat well, sleep enough and exercise."),
    ("What are the three primary colors?", "", "Red, blue and yellow."),
    ("Describe the structure of an atom.", "", "A nucleus of protons and neutrons, with electrons around it."),
    ("Rewrite the sentence in the passive voice.", "The cat chased the mouse.", "The mouse was chased by the cat."),
    ("Summarize the paragraph in one sentence.", "Bees pollinate flowers. Without them many crops would fail.", "Bees are vital to crops."),
    ("Name the capital of France.", "", "Paris."),
    ("Convert 10 degrees Celsius to Fahrenheit.", "", "50 degrees Fahrenheit."),
    ("Classify the animal as a mammal or a reptile.", "Snake", "Reptile."),
    ("Write a haiku about the sea.", "", "Waves fold into foam / the tide keeps its old promise / salt on the cold wind"),
    ("Explain why the sky is blue.", "", "Air scatters blue light more than red light."),
]


def write_seeds(path: Path) -> Path:
    rows = [{"instruction": i, "input": x, "output": o} for i, x, o in SEEDS]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


class _ChatHandler(BaseHTTPRequestHandler):
    """POST /v1/chat/completions -> the server's next canned answer, in OpenAI's JSON shape."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        server = self.server
        server.requests.append(body)
        time.sleep(server.delay)
        if self.path != "/v1/chat/completions":
            return self._send(404, {"error": {"message": f"no route {self.path}"}})
        content, finish = server.answers.pop(0) if server.answers else ("", "stop")
        self._send(200, {
            "id": f"chatcmpl-{len(server.requests)}", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        })  # fmt: skip

    def _send(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):  # keep the test output clean
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a handler still sleeping past the client's timeout must not hold up the test

    def handle_error(self, request, client_address):  # the client hung up on a slow answer: expected here
        pass


@contextlib.contextmanager
def endpoint(answers: list, delay: float = 0.0):
    """A fake OpenAI-compatible server on a free local port; yields (base_url, server)."""
    server = _Server(("127.0.0.1", 0), _ChatHandler)
    server.answers = [a if isinstance(a, tuple) else (a, "stop") for a in answers]
    server.requests, server.delay = [], delay
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", server
    finally:
        server.shutdown()
        server.server_close()


ANSWERS = [
    "Instruction: Name three musical instruments with strings.\nOutput: Guitar, violin and harp.",
    "Sure! Here is a fun fact about cats: they sleep a lot.",  # no layout at all
    "Instruction: Give three tips for staying healthy.\nOutput: Sleep, eat, move.",  # a seed again
    "Instruction: Name three musical instruments that have strings!\nOutput: Cello, harp, guitar.",  # the first again
    ("Instruction: Describe the water cycle.\nOutput: Water evaporates from the sea and then", "length"),  # cut off
    "Instruction: <|im_start|>Write a limerick about a frog.\nOutput: A frog on a log...",
    "Here is a new one.\n\n**Instruction:** Translate the greeting into Spanish.\n**Input:** Good morning\n**Output:** Buenos días.",
    "### Instruction\nHow many meters are there in 5 kilometers?\n### Response\n5000 meters.\n\nInstruction: and another task",
]


def test_synthesize_keeps_new_examples_and_counts_every_rejection(tmp_path):
    seeds = write_seeds(tmp_path / "seeds.jsonl")
    with endpoint(ANSWERS) as (url, server):
        report = synthesize(seeds, tmp_path / "new.jsonl", 3, EndpointClient(url, "fake-model", timeout=5), progress=False, seed=1)
    assert (report.requested, report.attempts, report.generated, report.kept, report.complete) == (3, 8, 8, 3, True)
    assert report.rejected == {"unparseable": 1, "duplicate": 2, "truncated": 1, "template_marker": 1}
    assert report.rejected_samples["unparseable"].startswith("Sure!")
    assert "3 of 3 examples kept (self-instruct by fake-model @ " in report.render() and "rejected 2 x duplicate" in report.render()
    rows = read(tmp_path / "new.jsonl")
    assert [r["instruction"] for r in rows] == [
        "Name three musical instruments with strings.", "Translate the greeting into Spanish.", "How many meters are there in 5 kilometers?"]  # fmt: skip
    assert rows[1]["input"] == "Good morning" and rows[2]["output"] == "5000 meters."
    for i, row in enumerate(rows):
        messages = to_example(Record(row, f"new.jsonl line {i + 1}"), DataConfig(format="alpaca"))["messages"]
        assert [m["role"] for m in messages] == ["user", "assistant"]
        provenance = row["provenance"]
        assert provenance["generator"] == f"fake-model @ {url}" and provenance["method"] == "self-instruct"
        assert provenance["seed_file"] == "seeds.jsonl" and 0 <= provenance["rouge_l_max"] < 0.7
        assert len(provenance["seed_lines"]) == 3 and all(1 <= line <= 10 for line in provenance["seed_lines"])
    # the request that produced the last example showed exactly the seeds its provenance names
    shown = [m["content"] for m in server.requests[-1]["messages"] if m["role"] == "assistant"]
    assert [text.splitlines()[0] for text in shown] == [f"Instruction: {SEEDS[line - 1][0]}" for line in rows[2]["provenance"]["seed_lines"]]
    assert server.requests[0]["model"] == "fake-model" and server.requests[0]["max_tokens"] == 256


def test_synthesize_stops_after_max_attempts_and_writes_nothing_without_a_kept_example(tmp_path):
    seeds = write_seeds(tmp_path / "seeds.jsonl")
    with endpoint(["no layout"] * 3) as (url, server):
        with pytest.raises(TunelabError, match=r"wrote no usable example in 2 attempts \(rejected: unparseable: 2\)"):
            synthesize(seeds, tmp_path / "new.jsonl", 5, EndpointClient(url, "m"), max_attempts=2, progress=False)
    assert len(server.requests) == 2 and not (tmp_path / "new.jsonl").exists()


def test_unanswering_endpoints_name_the_url_and_write_nothing(tmp_path):
    seeds = write_seeds(tmp_path / "seeds.jsonl")
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}/v1"
    with pytest.raises(TunelabError, match=f"The endpoint {closed} did not answer within 2 s.*could not connect"):
        synthesize(seeds, tmp_path / "new.jsonl", 2, EndpointClient(closed, "m", timeout=2, max_retries=0), progress=False)
    with endpoint([ANSWERS[0]], delay=3) as (url, _):
        start = time.perf_counter()
        with pytest.raises(TunelabError, match=f"The endpoint {url} did not answer within 1 s"):
            synthesize(seeds, tmp_path / "new.jsonl", 2, EndpointClient(url, "m", timeout=1, max_retries=0), progress=False)
        assert time.perf_counter() - start < 2.5
    assert not (tmp_path / "new.jsonl").exists()


def test_endpoint_errors_and_missing_openai_are_clear(tmp_path, monkeypatch):
    with endpoint([]) as (url, _):
        client = EndpointClient(url.removesuffix("/v1") + "/wrong", "m", max_retries=0)
        with pytest.raises(TunelabError, match=r"refused the request for model 'm' \(HTTP 404"):
            client.complete([{"role": "user", "content": "hi"}])
    monkeypatch.setitem(sys.modules, "openai", None)
    with pytest.raises(TunelabError, match="pip install openai"):
        EndpointClient("http://127.0.0.1:1/v1", "m")


def test_bad_synthesis_inputs_fail_before_any_request(tmp_path):
    seeds = write_seeds(tmp_path / "seeds.jsonl")
    with endpoint([]) as (url, server):
        client = EndpointClient(url, "m")
        with pytest.raises(TunelabError, match="extension '.txt'"):
            synthesize(seeds, tmp_path / "new.txt", 2, client)
        with pytest.raises(TunelabError, match=r"the field 'prompt' \(prompt_field\)\. The records' fields are: input, instruction, output"):
            synthesize(seeds, tmp_path / "new.jsonl", 2, client, seed_format="prompt_completion")
        with pytest.raises(TunelabError, match="does not exist"):
            synthesize(tmp_path / "none.jsonl", tmp_path / "new.jsonl", 2, client)
    assert server.requests == []


def test_augment_paraphrases_instructions_and_keeps_answers(tmp_path):
    seeds = tmp_path / "few.jsonl"
    seeds.write_text("".join(json.dumps({"instruction": i, "input": x, "output": o}) + "\n" for i, x, o in SEEDS[:3]), encoding="utf-8")
    answers = [
        "Rewritten instruction: What are three things a person can do to keep healthy?",
        "What are the three primary colors?",  # the original again
        '"Which three colors are called primary?"',
        "Paris is a lovely city to visit in spring.\n\nIt has many museums.",  # not about the instruction at all
        "Explain how an atom is built.",
    ]
    with endpoint(answers) as (url, _):
        report = augment(seeds, tmp_path / "more.jsonl", EndpointClient(url, "m"), tries_per_paraphrase=2, progress=False)
    assert (report.requested, report.attempts, report.kept, report.written) == (3, 5, 3, 6)
    assert report.rejected == {"too_similar": 1, "unrelated": 1}
    rows = read(tmp_path / "more.jsonl")
    assert [r["instruction"] for r in rows[3:]] == [
        "What are three things a person can do to keep healthy?", "Which three colors are called primary?", "Explain how an atom is built."]  # fmt: skip
    assert [(r["input"], r["output"]) for r in rows[3:]] == [(x, o) for _, x, o in SEEDS[:3]]
    assert [r["provenance"]["source_line"] for r in rows[3:]] == [1, 2, 3]
    assert all(r["provenance"]["method"] == "paraphrase" and r["provenance"]["rouge_l_original"] < 0.7 for r in rows[3:])
    assert "provenance" not in rows[0]


def test_parse_example_is_lenient_about_layout():
    assert parse_example("Instructions: Add 2 and 3.\nInput: N/A\nOutput: 5\nAnswer: 5") == (
        {"instruction": "Add 2 and 3.", "input": "", "output": "5\nAnswer: 5"}, None)  # fmt: skip
    assert parse_example("1. Task: Name a fruit.\nResponse: Apple.\n---")[0] == {"instruction": "Name a fruit.", "input": "", "output": "Apple."}
    assert parse_example("Instruction: What is the structure of an atom?\n") == (None, "unparseable")
    assert parse_paraphrase('Instruction: "Which city is the capital of France?"\n\nParis.', "Name the capital of France.") == (
        "Which city is the capital of France?")  # fmt: skip


def test_similarity_is_rouge_l_and_handles_any_script():
    from rouge_score import rouge_scorer

    texts = ["Give three tips for staying healthy.", "What are the three primary colors?", "Name the capital of France."]
    index = Similarity(texts)
    query = "Give me three tips to stay healthy and happy"
    words = index._words
    exact = max(rouge_scorer.RougeScorer(["rougeL"], tokenizer=words).score(t, query)["rougeL"].fmeasure for t in texts)
    assert index.best(query) == pytest.approx(exact) and index.best(texts[1]) == 1.0
    assert Similarity(["日本の 首都は どこ"]).best("日本の 首都は どこ ですか") > 0.7


def test_local_client_samples_reproducibly_from_a_tiny_model(tokenizer):
    from tunelab.models import CausalLMPool

    class Loaded:  # a pool that hands out the same random weights every time
        model = CausalLMPool(config={"model_type": "llama", "vocab_size": len(tokenizer), **TINY_LLAMA}, tokenizer_path=SMOLLM2_GGUF).load_model()

        def load_model(self, **sizes):
            return self.model

        def load_tokenizer(self):
            return tokenizer

    messages = [{"role": "user", "content": "Write a task."}]
    first, second = LocalModelClient(Loaded(), seed=5), LocalModelClient(Loaded(), seed=5)
    assert first.complete(messages, max_tokens=8) == second.complete(messages, max_tokens=8)
    assert first.truncated  # a random model does not stop by itself
    assert first.complete(messages, max_tokens=8) != first.complete(messages, max_tokens=8)  # each call draws anew


def test_local_client_sizes_a_model_built_from_a_config_to_the_tokenizer():
    """modelpool=CausalLMPool/tiny-llama (a config, no weights): the model gets the tokenizer's
    vocabulary, as in training (it used to keep the config's default and fail on the first token)."""
    from tunelab.config import compose_config, instantiate

    client = LocalModelClient(instantiate(compose_config(["modelpool=CausalLMPool/tiny-llama"]).modelpool), seed=1)
    assert isinstance(client.complete([{"role": "user", "content": "Write a task."}], max_tokens=4), str)
    model, tokenizer = client._load()
    assert model.get_input_embeddings().num_embeddings == len(tokenizer)


@pytest.mark.slow
def test_smollm2_writes_new_examples_from_ten_alpaca_seeds(tmp_path):
    rows = json.loads(shared_data("alpaca", "alpaca_cleaned_1000.json").read_text(encoding="utf-8"))[:10]
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    client = LocalModelClient(SMOLLM2_GGUF)
    report = synthesize(seeds, tmp_path / "new.jsonl", 3, client, max_tokens=200, progress=False)
    assert report.kept == 3, report
    written = read(tmp_path / "new.jsonl")
    for i, row in enumerate(written):
        assert to_example(Record(row, f"line {i + 1}"), DataConfig(format="alpaca"))["messages"][-1]["content"] == row["output"]
        assert row["provenance"]["rouge_l_max"] < 0.7 and row["instruction"] not in [r["instruction"] for r in rows]
