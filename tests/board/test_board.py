"""The board's pieces without a browser: the launch form says what the command line says, each
error next to its field; run folders' status; compare; the chat's base; the port check."""

import json
import socket

import pytest

from tunelab.board.chat import base_spec, tuned_checkpoint
from tunelab.board.form import form_overrides, validate
from tunelab.board.runs import RunBook
from tunelab.cli.main import main
from tunelab.errors import UsageError

TINY = {"name": "ok", "method": "lm_finetune/fullfinetune_sft", "modelpool": "CausalLMPool/tiny-llama", "data": "gsm8k-demo", "taskpool": "heldout-loss"}


def cli_error(capsys, overrides: list[str]) -> str:
    """What `tunelab train OVERRIDES` prints when it refuses them."""
    assert main(["train", *overrides]) in (1, 2)  # 2: a config error, 1: the data refused
    return capsys.readouterr().err.removeprefix("error: ").strip()


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"method.optimizer.lr": "-1"}, "method.optimizer.lr"),
        ({"method.max_steps": "0"}, "method.max_steps"),
        ({"data.path": "BROKEN"}, "data.path"),  # a line that is not JSON: data.validate's refusal, with the line
        ({"method": "lm_finetune/nonesuch"}, "method"),
        ({"extra": "method.lrr=3"}, "extra"),
    ],
)
def test_a_bad_field_gets_the_command_lines_own_error_next_to_it(tmp_path, capsys, change, field):
    if change.get("data.path") == "BROKEN":
        broken = tmp_path / "broken.jsonl"
        broken.write_text('{"prompt": "2+2?", "completion": "4"}\n{"prompt": "3+3?", "completion": \n')
        change = {"data.path": str(broken), "data": "default"}
    form = {**TINY, **change}
    overrides, errors = validate(form, RunBook(tmp_path))
    assert list(errors) == [field]
    assert errors[field] == cli_error(capsys, overrides)


def test_a_good_form_means_the_overrides_a_user_would_type(tmp_path):
    form = {**TINY, "method.optimizer.lr": "1e-3", "method.max_steps": "5", "extra": "# a comment\nmethod.lr_scheduler.warmup_steps=2\n"}
    overrides, errors = validate(form, RunBook(tmp_path))
    assert errors == {}
    assert overrides == [
        "method=lm_finetune/fullfinetune_sft", "modelpool=CausalLMPool/tiny-llama", "data=gsm8k-demo", "taskpool=heldout-loss",
        "method.optimizer.lr=1e-3", "method.max_steps=5", "method.lr_scheduler.warmup_steps=2",
        "method.save_ckpt_type=hf",  # an empty checkpoint format: a folder chat and export load
    ]  # fmt: skip
    lora, errors = validate({**TINY, "method": "lm_finetune/peftfinetune_sft"}, RunBook(tmp_path), load_data=False)
    assert errors == {} and lora[-1] == "method.save_ckpt_type=peft"
    assert form_overrides({"name": "x", "method.optimizer.lr": "  "}) == []


def test_run_names_are_checked_and_taken_names_refused(tmp_path):
    book = RunBook(tmp_path)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "run.json").write_text("{}")
    for name, words in (("a b", "use letters, digits"), ("../up", "use letters, digits"), ("taken", "already exists")):
        _, errors = validate({**TINY, "name": name}, book, load_data=False)
        assert words in errors["name"]
    with pytest.raises(UsageError, match="already exists"):
        book.launch("taken", ["method.max_steps=1"])


def write_run(folder, config: dict, metrics: str, summary: dict | None = None, marker: dict | None = None):
    folder.mkdir(parents=True)
    from omegaconf import OmegaConf

    (folder / "config.yaml").write_text(OmegaConf.to_yaml(config))
    (folder / "metrics.csv").write_text(metrics)
    (folder / "run.json").write_text(json.dumps(marker or {"started": "2026-11-27 10:00:00", "total_steps": 4}))
    if summary is not None:
        (folder / "summary.json").write_text(json.dumps(summary))


def test_status_and_compare_read_command_line_runs(tmp_path):
    metrics = "step,train/loss,train/step_seconds,val/loss\n0,,,3.0\n1,2.5,9.0,\n2,2.0,0.5,\n3,1.5,0.5,\n"
    write_run(tmp_path / "a", {"method": {"optimizer": {"lr": 0.001}, "max_steps": 4}, "seed": 1, "output_dir": "a"}, metrics,
              marker={"started": "x", "total_steps": 4, "estimate": {"seconds_per_step": 0.4, "peak_gib": 1.5}})  # fmt: skip
    write_run(tmp_path / "b", {"method": {"optimizer": {"lr": 0.002}, "max_steps": 4}, "seed": 1, "output_dir": "b"},
              metrics + "4,1.0,0.5,2.0\n", {"global_step": 4, "train_seconds": 10.5, "tokens_per_s": 99.0})  # fmt: skip
    write_run(tmp_path / "c", {"seed": 2}, "step,train/loss\n1,3.0\n", {"global_step": 1, "stopped": True})
    book = RunBook(tmp_path)
    a, b, c = (book.status(n) for n in "abc")
    assert (a["status"], a["step"], a["progress"]) == ("incomplete", 3, 0.75)
    assert a["measured_s_per_step"] == 0.5 and a["estimated_s_per_step"] == 0.4  # the first (warm-up) step is left out
    assert (b["status"], c["status"]) == ("finished", "stopped") and not b["launched_here"] and not c["can_resume"]
    report = book.compare(["a", "b"])
    assert [d["key"] for d in report["differences"]] == ["method.optimizer.lr"]  # output_dir differs by nature
    assert report["finals"]["b"]["train/loss"] == 1.0 and report["finals"]["b"]["val/loss"] == 2.0 and report["finals"]["a"]["val/loss"] == 3.0
    assert report["finals"]["b"]["tokens_per_s"] == 99.0


def test_the_chats_base_is_the_runs_model_path_or_its_shipped_pool(tmp_path):
    from omegaconf import OmegaConf

    from tunelab.config import CONFIG_DIR

    tiny = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "modelpool" / "CausalLMPool" / "tiny-llama.yaml"))
    write_run(tmp_path / "shipped", {"modelpool": tiny}, "step\n")
    write_run(tmp_path / "path", {"modelpool": {**tiny, "model_path": "/models/base"}}, "step\n")
    write_run(tmp_path / "other", {"modelpool": {**tiny, "config": {"hidden_size": 8}}}, "step\n")
    assert base_spec(tmp_path / "shipped") == "tiny-llama" and base_spec(tmp_path / "path") == "/models/base"
    with pytest.raises(UsageError, match="none of the shipped pools"):
        base_spec(tmp_path / "other")
    with pytest.raises(UsageError, match="no checkpoint yet"):
        tuned_checkpoint(tmp_path / "shipped")
    lightning = tmp_path / "shipped" / "checkpoints" / "step-000001"
    lightning.mkdir(parents=True)
    (lightning / "state.ckpt").write_bytes(b"")
    (lightning.parent / "latest").write_text("step-000001\n")
    with pytest.raises(UsageError, match="Lightning's format"):
        tuned_checkpoint(tmp_path / "shipped")


def test_a_port_in_use_is_refused_with_what_to_do(capsys):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        assert main(["board", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"Port {port} on 127.0.0.1 is already in use" in err and "pass --port N" in err


def test_chat_serves_an_adapter_run_from_one_server_and_reuses_it(tmp_path):
    from tunelab.board.chat import ChatServers
    from tunelab.config import compose_config
    from tunelab.engine import train

    folder = tmp_path / "lora"
    train(compose_config(["method=lm_finetune/peftfinetune_sft", "modelpool=CausalLMPool/tiny-llama", "data=gsm8k-demo", "data.max_samples=16",
                          "method.max_steps=2", "method.save_ckpt_type=peft", "method.optimizer.lr=1e-2", f"output_dir={folder}", "progress_bar=false"]))  # fmt: skip
    chat = ChatServers(startup_seconds=120)
    try:
        first = chat.ask(folder, "What is 2+3?", max_tokens=4)
        pair = chat.pairs["lora"]
        assert len(pair.servers) == 1 and pair.checkpoint.name == "step-000002"  # the base and the adapter in one process
        assert first["base"]["tokens"] == first["tuned"]["tokens"] == 4 and first["base_model"] == "tiny-llama"
        assert "random weights" in first["base_note"]
        second = chat.ask(folder, "And 3+4?", max_tokens=2)
        assert chat.pairs["lora"] is pair and second["tuned"]["tokens"] == 2  # no restart for the same checkpoint
        with pytest.raises(UsageError, match="Write a prompt"):
            chat.ask(folder, "  ")
    finally:
        chat.close()
    assert pair.servers[0].process.poll() is not None


def test_resume_is_refused_for_runs_it_cannot_continue(tmp_path):
    book = RunBook(tmp_path)
    write_run(tmp_path / "cli", {"seed": 1}, "step,train/loss\n1,2.0\n")
    with pytest.raises(UsageError, match="not launched from the board.*method.ckpt_path="):
        book.resume("cli")
    for name, summary, words in (("done", {"global_step": 2}, "has finished"), ("fresh", None, "no checkpoint to resume from")):
        write_run(tmp_path / name, {"seed": 1}, "step,train/loss\n1,2.0\n", summary)
        (tmp_path / name / "board.json").write_text(json.dumps({"overrides": ["method.max_steps=2"], "returncode": 0, "events": []}))
        with pytest.raises(UsageError, match=words):
            book.resume(name)
    with pytest.raises(UsageError, match="is not running"):
        book.stop("done")
