"""tunelab serve against the official openai client: models, chat (whole and streamed), completions
with logprobs and echo, adapters (at start and hot-loaded), batching, and refusals that leave the
server serving."""

import socket
import threading
import time

import pytest
import torch

openai = pytest.importorskip("openai", reason="the openai client is a dev dependency (pip install -e .[dev])")
pytest.importorskip("fastapi", reason="tunelab serve needs fastapi and uvicorn (pip install 'tunelab[serve]')")


def make_adapter(base_folder, folder, seed: int):
    """A LoRA adapter with non-zero weights, so that it changes what the base says."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_folder),
                           LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False))  # fmt: skip
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def served(tiny_base_model, tmp_path_factory):
    import uvicorn

    from tunelab.deploy.server import Limits, ModelServer, create_app
    from tunelab.evaluation.models import load_eval_model

    from tunelab.deploy.registry import Registry

    adapters = tmp_path_factory.mktemp("adapters")
    first, second, third = (make_adapter(tiny_base_model, adapters / name, seed) for name, seed in (("a1", 1), ("a2", 2), ("a3", 3)))
    registry = Registry(f"sqlite:///{tmp_path_factory.mktemp('registry') / 'registry.db'}")
    registry.register("m", first), registry.register("m", second)
    server = ModelServer(load_eval_model(str(tiny_base_model), device="cpu"), {"a1": str(first), "a2": str(second)}, [str(adapters)],
                         Limits(max_batch=8, queue_size=16, max_tokens=64), name="tiny", registry=registry,
                         routes={"ab": [("a1", 0.8), ("a2", 0.2)]}, ab_log=str(tmp_path_factory.mktemp("ab") / "ab.jsonl"))  # fmt: skip
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = uvicorn.Config(create_app(server, api_key="secret"), host="127.0.0.1", port=port, log_level="warning")
    http = uvicorn.Server(config)
    thread = threading.Thread(target=http.run, daemon=True)
    thread.start()
    while not http.started:
        time.sleep(0.05)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="secret", max_retries=0)
    yield {"client": client, "server": server, "port": port, "third": third, "base": tiny_base_model, "registry": registry}
    http.should_exit = True
    thread.join(timeout=10)


def local_greedy(base_folder, adapter, messages, max_tokens: int) -> str:
    """What the model says, run here without the server (the reference)."""
    from tunelab.evaluation.models import load_eval_model

    local = load_eval_model(str(base_folder), adapter=str(adapter) if adapter else None, device="cpu")
    return local.generate([messages], max_new_tokens=max_tokens, greedy=True)[0].text


MESSAGES = [{"role": "user", "content": "Tom has 3 apples and buys 4 more. How many?"}]


def call(port: int, method: str, path: str, body=None, raw: bytes | None = None, key: str = "secret") -> tuple[int, dict]:
    """One HTTP request with the standard library: (status, JSON body)."""
    import json
    import urllib.error
    import urllib.request

    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method,
                                     headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_models_and_chat_for_the_base_and_each_adapter(served):
    client = served["client"]
    assert [m.id for m in client.models.list().data] == ["tiny", "a1", "a2", "ab"]
    answers = {}
    for model, adapter in (("tiny", None), ("a1", served["server"].known["a1"]), ("a2", served["server"].known["a2"])):
        reply = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=12, temperature=0)
        answers[model] = reply.choices[0].message.content
        assert reply.usage.completion_tokens <= 12 and reply.usage.prompt_tokens > 10 and reply.choices[0].finish_reason in ("stop", "length")
        assert answers[model].strip() == local_greedy(served["base"], adapter, MESSAGES, 12)
    assert len(set(answers.values())) == 3  # each adapter changes the answer


def test_streamed_chat_is_the_whole_answer_in_pieces(served):
    client = served["client"]
    whole = client.chat.completions.create(model="a1", messages=MESSAGES, max_tokens=16, temperature=0)
    pieces = list(client.chat.completions.create(model="a1", messages=MESSAGES, max_tokens=16, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in pieces if c.choices)
    assert text == whole.choices[0].message.content and len([c for c in pieces if c.choices]) > 3
    assert pieces[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_completions_logprobs_and_echo_match_a_forward_pass(served):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    client = served["client"]
    reply = client.completions.create(model="tiny", prompt="The capital of France is", max_tokens=0, echo=True, logprobs=2)
    logprobs = reply.choices[0].logprobs
    tokenizer = AutoTokenizer.from_pretrained(served["base"])
    ids = tokenizer("The capital of France is")["input_ids"]
    with torch.no_grad():
        log_probs = AutoModelForCausalLM.from_pretrained(served["base"])(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
    assert logprobs.token_logprobs[0] is None and len(logprobs.tokens) == len(ids)
    assert logprobs.token_logprobs[1:] == pytest.approx([float(log_probs[k - 1, t]) for k, t in enumerate(ids) if k > 0], abs=1e-4)
    assert all(len(top) == 2 for top in logprobs.top_logprobs[1:]) and reply.choices[0].text == "The capital of France is"
    generated = client.completions.create(model="tiny", prompt="The capital of France is", max_tokens=5, temperature=0, logprobs=0)
    assert len(generated.choices[0].logprobs.tokens) == generated.usage.completion_tokens


def test_concurrent_requests_for_the_base_and_different_adapters_share_one_batch_and_answer_as_alone(served):
    client, server = served["client"], served["server"]
    questions = [MESSAGES, [{"role": "user", "content": "Say hello."}], [{"role": "user", "content": "What is 12 times 7, and why?"}]]
    models = ("a1", "a2", "tiny")
    alone = {(m, q): client.chat.completions.create(model=m, messages=questions[q], max_tokens=10, temperature=0).choices[0].message.content
             for m in models for q in range(3)}  # fmt: skip
    before = dict(server.counts)
    results = {}

    def ask(i):
        model, q = models[i % 3], (i // 3) % 3
        results[i] = (model, q, client.chat.completions.create(model=model, messages=questions[q], max_tokens=10, temperature=0).choices[0].message.content)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    with server.lock:  # the worker waits for the model while all eight requests arrive
        for t in threads:
            t.start()
        for _ in range(200):
            if server.jobs.qsize() + len(server.waiting) >= 7:
                break
            time.sleep(0.05)
    for t in threads:
        t.join()
    assert len(results) == 8 and all(text == alone[model, q] for model, q, text in results.values())
    # the first taken at once, the other seven (base, a1 and a2, different prompt lengths) joining it
    assert server.counts["largest_batch"] >= 7 and server.counts["mixed_steps"] > before["mixed_steps"]


def test_a_request_joins_a_batch_that_is_decoding_and_leaves_it_when_done(served):
    client, server = served["client"], served["server"]
    before = dict(server.counts)
    long = client.chat.completions.create(model="a1", messages=MESSAGES, max_tokens=64, temperature=0, stream=True)
    pieces = iter(long)
    while not (next(pieces).choices[0].delta.content or ""):  # the long answer is decoding
        pass
    short = client.chat.completions.create(model="a2", messages=[{"role": "user", "content": "Hi"}], max_tokens=2, temperature=0)
    rest = list(pieces)
    assert short.usage.completion_tokens <= 2 and rest[-1].choices[0].finish_reason is not None
    assert server.counts["mixed_steps"] > before["mixed_steps"]  # a1 and a2 rows in one step: the short one joined the long one


def test_adapters_peft_cannot_mix_dora_batch_only_with_requests_for_themselves(tiny_base_model, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tunelab.deploy.server import Job, Limits, ModelServer
    from tunelab.evaluation.models import load_eval_model

    torch.manual_seed(0)
    dora = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_base_model), LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    dora.save_pretrained(tmp_path / "dora")
    plain = make_adapter(tiny_base_model, tmp_path / "plain", 1)
    server = ModelServer(load_eval_model(str(tiny_base_model), device="cpu"), {"dora": str(tmp_path / "dora"), "plain": str(plain)},
                         limits=Limits(max_batch=8, max_resident=2), name="tiny")  # fmt: skip
    assert server.mixable == {"plain"}
    with server.lock:  # the worker takes no job while this test forms batches itself

        def job(model, temperature=0.0):
            return Job(model, [1, 2, 3], 4, temperature, 1.0, None, None)

        for j in [job("tiny"), job("plain"), job("tiny"), job("dora"), job("dora"), job("plain", 0.7), job("plain", 0.7), job("tiny")]:
            server.waiting.append(j)
        assert [(j.model, j.temperature) for j in server._joining([])] == [("tiny", 0.0), ("plain", 0.0), ("tiny", 0.0)]
        assert [j.model for j in server._joining([])] == ["dora", "dora"]
        assert [(j.model, j.temperature) for j in server._joining([])] == [("plain", 0.7), ("plain", 0.7)]
        # a request that cannot join stops the ones behind it from overtaking it
        running = [job("tiny")]
        for j in [job("tiny"), job("tiny", 0.7), job("tiny")]:
            server.waiting.append(j)
        assert [(j.model, j.temperature) for j in server._joining(running)] == [("tiny", 0.0)] * 2  # the one left from before, then one
        assert [(j.model, j.temperature) for j in server._joining([])] == [("tiny", 0.7)]
        assert [(j.model, j.temperature) for j in server._joining([])] == [("tiny", 0.0)]


def test_a_request_that_fails_to_join_fails_alone(served, monkeypatch):
    client, server = served["client"], served["server"]
    expected = client.chat.completions.create(model="a1", messages=MESSAGES, max_tokens=48, temperature=0).choices[0].message.content
    load = server._load

    def broken(name):
        if name == "a2":
            raise RuntimeError("a2's weights are gone")
        return load(name)

    long = client.chat.completions.create(model="a1", messages=MESSAGES, max_tokens=48, temperature=0, stream=True)
    pieces = iter(long)
    text = ""
    while not text:  # the long answer is decoding
        text = next(pieces).choices[0].delta.content or ""
    monkeypatch.setattr(server, "_load", broken)
    with pytest.raises(openai.InternalServerError, match="a2's weights are gone"):
        client.chat.completions.create(model="a2", messages=MESSAGES, max_tokens=4, temperature=0)
    monkeypatch.setattr(server, "_load", load)
    text += "".join(c.choices[0].delta.content or "" for c in pieces if c.choices)
    assert text == expected  # the row that was decoding went on undisturbed


def test_hot_loading_and_unloading_an_adapter(served):
    client, port = served["client"], served["port"]
    status, loaded = call(port, "POST", "/v1/adapters", {"name": "a3", "path": str(served["third"])})
    assert status == 200 and "a3" in loaded["models"]
    reply = client.chat.completions.create(model="a3", messages=MESSAGES, max_tokens=8, temperature=0)
    assert reply.choices[0].message.content.strip() == local_greedy(served["base"], served["third"], MESSAGES, 8)
    status, outside = call(port, "POST", "/v1/adapters", {"name": "x", "path": "/etc"})
    assert status == 403 and "outside the folders" in outside["error"]["message"]
    assert call(port, "DELETE", "/v1/adapters/a3")[0] == 200
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="a3", messages=MESSAGES, max_tokens=8)


def test_registry_references_follow_promotion_and_rollback_without_a_restart(served):
    client, registry = served["client"], served["registry"]
    answers = {m: client.chat.completions.create(model=m, messages=MESSAGES, max_tokens=8, temperature=0).choices[0].message.content for m in ("a1", "a2")}

    def production() -> str:
        raw = client.chat.completions.with_raw_response.create(model="m@production", messages=MESSAGES, max_tokens=8, temperature=0)
        reply = raw.parse()
        assert reply.model == "m@production"
        served = raw.headers["x-tunelab-model"]  # the version that answered
        assert reply.choices[0].message.content == answers[{"m@v1": "a1", "m@v2": "a2"}[served]]
        return reply.choices[0].message.content

    with pytest.raises(openai.NotFoundError, match="has no production version"):
        production()
    registry.promote("m", 1)
    assert "m@production" in [m.id for m in client.models.list().data]
    assert production() == answers["a1"]
    registry.promote("m", 2)
    assert production() == answers["a2"]
    registry.rollback("m")
    assert production() == answers["a1"]
    assert client.chat.completions.create(model="m@2", messages=MESSAGES, max_tokens=8, temperature=0).choices[0].message.content == answers["a2"]
    with pytest.raises(openai.NotFoundError, match="no model named 'other'"):
        client.chat.completions.create(model="other@production", messages=MESSAGES)


def test_an_ab_split_follows_its_weights_sticks_to_a_user_and_counts_each_variant(served):
    client, port = served["client"], served["port"]
    seen = {}
    for i in range(300):
        raw = client.chat.completions.with_raw_response.create(model="ab", messages=MESSAGES, max_tokens=1, temperature=0, user=f"user-{i}")
        seen[i] = raw.headers["x-tunelab-variant"]
        assert raw.parse().model == "ab"
    share = sum(v == "a1" for v in seen.values()) / 300
    assert abs(share - 0.8) < 0.07  # three standard errors of a 300-request share
    again = {client.chat.completions.with_raw_response.create(model="ab", messages=MESSAGES, max_tokens=1, user="user-7").headers["x-tunelab-variant"]
             for _ in range(5)}  # fmt: skip
    assert again == {seen[7]}  # sticky per user
    import urllib.request

    with urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers={"Authorization": "Bearer secret"})) as response:
        text = response.read().decode()
    counted = {v: int(next(line.split()[-1] for line in text.splitlines() if line.startswith(f'tunelab_variant_requests_total{{route="ab",variant="{v}"}}')))
               for v in ("a1", "a2")}  # fmt: skip
    assert sum(counted.values()) == 305 and counted["a1"] == sum(v == "a1" for v in seen.values()) + 5 * (seen[7] == "a1")
    assert 'tunelab_variant_latency_seconds_sum{route="ab",variant="a2"}' in text
    server = served["server"]
    before = sum(c["requests"] for (route, _), c in server.variants.items() if route == "ab")
    list(client.chat.completions.create(model="ab", messages=MESSAGES, max_tokens=2, stream=True, user="user-7"))
    assert sum(c["requests"] for (route, _), c in server.variants.items() if route == "ab") == before + 1  # streamed requests count too


def test_feedback_and_the_ab_log_feed_tunelab_eval_ab(served, capsys):
    import json

    from tunelab.cli.eval_stats import cmd_ab

    client, port, server = served["client"], served["port"], served["server"]
    outcomes = {}
    for i in range(60):
        raw = client.chat.completions.with_raw_response.create(model="ab", messages=MESSAGES, max_tokens=1, temperature=0, user=f"fb-{i}")
        variant = raw.headers["x-tunelab-variant"]
        outcomes[raw.parse().id] = (variant, int(variant == "a1" or i % 4 == 0))  # users like a1's answers more
    for ident, (_, outcome) in outcomes.items():
        status, row = call(port, "POST", "/v1/feedback", {"id": ident, "outcome": outcome})
        assert status == 200 and row["variant"] == outcomes[ident][0]
    assert call(port, "POST", "/v1/feedback", {"id": "chatcmpl-unknown", "outcome": 1})[0] == 404
    assert call(port, "POST", "/v1/feedback", {"id": next(iter(outcomes)), "outcome": "good"})[0] == 400
    log = [json.loads(line) for line in server.ab_log.read_text().splitlines()]
    answers = [r for r in log if "latency_s" in r and r["id"] in outcomes]
    assert len(answers) == 60 and all(r["route"] == "ab" and r["model"] == r["variant"] and r["user"].startswith("fb-") for r in answers)
    assert cmd_ab([str(server.ab_log), "--where", "route=ab", "--outcome", "outcome", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    per_variant = {v: [o for vv, o in outcomes.values() if vv == v] for v in ("a1", "a2")}
    assert (report["a"], report["b"], report["kind"]) == ("a1", "a2", "proportion")
    assert (report["n_a"], report["n_b"]) == (len(per_variant["a1"]), len(per_variant["a2"]))
    assert report["proportion"]["rate_a"] == pytest.approx(1.0) and report["proportion"]["rate_b"] == pytest.approx(sum(per_variant["a2"]) / len(per_variant["a2"]))
    assert cmd_ab([str(server.ab_log), "--where", "route=ab", "--outcome", "latency_s", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["kind"] == "score"


def test_refusals_have_the_right_status_and_the_server_keeps_serving(served):
    client, port = served["client"], served["port"]
    with pytest.raises(openai.NotFoundError, match="'nope' does not exist"):
        client.chat.completions.create(model="nope", messages=MESSAGES)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.BadRequestError, match="max_tokens must be an integer from 0 to 64"):
        client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=1000)
    with pytest.raises(openai.BadRequestError, match="messages must be a non-empty list"):
        client.chat.completions.create(model="tiny", messages=[])
    status, broken = call(port, "POST", "/v1/chat/completions", raw=b'{"model": "tiny", "messages": [')
    assert status == 400 and "not valid JSON" in broken["error"]["message"]
    import http.client
    import json

    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)  # announces a 5 MB body: refused before it is sent
    connection.putrequest("POST", "/v1/chat/completions")
    for header, value in (("Authorization", "Bearer secret"), ("Content-Type", "application/json"), ("Content-Length", str(5 << 20))):
        connection.putheader(header, value)
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 413 and "at most 1048576" in json.loads(response.read())["error"]["message"]
    connection.close()
    assert call(port, "GET", "/v1/models", key="wrong")[0] == 401
    assert client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4).choices[0].message.content is not None


def test_a_full_queue_answers_503_with_retry_after(tiny_base_model):
    import asyncio

    from tunelab.deploy.server import Job, Limits, ModelServer, ServeError
    from tunelab.evaluation.models import load_eval_model

    server = ModelServer(load_eval_model(str(tiny_base_model), device="cpu"), limits=Limits(queue_size=1), name="tiny")
    loop = asyncio.new_event_loop()
    with server.lock:  # the worker cannot decode: requests pile up in the queue
        jobs = [Job("tiny", [1, 2, 3], 4, 0.0, 1.0, loop, asyncio.Queue()) for _ in range(3)]
        server.submit(jobs[0])
        time.sleep(0.2)  # the worker takes it and waits for the model
        server.submit(jobs[1])
        with pytest.raises(ServeError) as refused:
            server.submit(jobs[2])
    assert refused.value.status == 503 and refused.value.headers == {"Retry-After": "1"}
    loop.close()


def test_the_command_line_serves_on_localhost(tmp_path):
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "tunelab", "serve", "--model", "tiny-llama", "--port", str(port)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        for _ in range(600):
            try:
                status, models = call(port, "GET", "/v1/models")
                break
            except OSError:
                if process.poll() is not None:
                    pytest.fail(process.stdout.read())
                time.sleep(0.1)
        assert status == 200 and [m["id"] for m in models["data"]] == ["tiny-llama"]
    finally:
        process.terminate()
        output = process.communicate(timeout=30)[0]
    assert f"Serving tiny-llama on http://127.0.0.1:{port}/v1" in output
    bad = subprocess.run([sys.executable, "-m", "tunelab", "serve", "--model", "tiny-llama", "--adapter", "nopath"], capture_output=True, text=True)
    assert bad.returncode == 1 and "write NAME=PATH" in bad.stderr


def test_routes_are_checked_before_serving(tiny_base_model):
    from tunelab.deploy.server import ModelServer, parse_routes
    from tunelab.errors import TunelabError
    from tunelab.evaluation.models import load_eval_model

    assert parse_routes(["chat=m@production:0.9,m@staging:0.1"]) == {"chat": [("m@production", 0.9), ("m@staging", 0.1)]}
    for bad in ("chat=a1", "chat=a1:0", "=a1:1", "chat", "chat=a1:x"):
        with pytest.raises(TunelabError, match="write NAME=VARIANT:WEIGHT"):
            parse_routes([bad])
    with pytest.raises(TunelabError, match="its variants nope are not served"):
        ModelServer(load_eval_model(str(tiny_base_model), device="cpu"), name="tiny", routes={"chat": [("tiny", 1.0), ("nope", 1.0)]})
