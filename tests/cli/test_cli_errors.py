"""``tunelab`` command line, in-process: help, --cfg job, and one-paragraph errors."""

import json

import pytest

from tunelab.cli.main import main


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _assert_clean_error(err: str) -> str:
    """A user error: one 'error:' paragraph on stderr, no traceback."""
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    assert "\n\n" not in err.strip(), err  # one paragraph
    return lines[0]


def test_top_level_usage(capsys):
    code, out, _ = _run(capsys)
    assert code == 0
    assert "train" in out and "demo" in out
    code, _, _ = _run(capsys, "frobnicate")
    assert code == 2


def test_train_help_lists_groups_and_options(capsys):
    code, out, _ = _run(capsys, "train", "--help")
    assert code == 0
    for text in (
        "method",
        "modelpool",
        "taskpool",
        "lm_finetune/fullfinetune_sft",
        "fullfinetune_sft",
        "CausalLMPool/tiny-llama",
        "tiny-llama",
        "smollm2-135m",
        "heldout-loss",
        "gsm8k-demo",
        "--cfg job",
        "completion_field",  # the data keys are listed
        "val_fraction",
    ):
        assert text in out, text


def test_cfg_job_prints_resolved_yaml_without_training(capsys, tmp_path):
    out_dir = tmp_path / "run"
    code, out, err = _run(
        capsys, "train", "method.optimizer.lr=3e-4", f"output_dir={out_dir}", "data.path=nowhere.jsonl", "--cfg", "job"
    )
    assert code == 0, err
    assert "max_lr: 0.0003" in out
    assert "lr: 0.0003" in out
    assert "${" not in out  # interpolations are resolved
    assert "T_max: _T_max_" in out
    assert f"output_dir: {out_dir}" in out
    assert not out_dir.exists()  # nothing ran
    assert "Finished" not in out


def test_cfg_job_still_validates(capsys):
    code, out, err = _run(capsys, "train", "method.max_epochs=abc", "--cfg", "job")
    assert code == 2  # usage and config errors exit 2
    line = _assert_clean_error(err)
    assert "method.max_epochs" in line
    assert out == ""


def test_unknown_key_is_a_one_paragraph_error(capsys):
    code, out, err = _run(capsys, "train", "method.lrr=1", "--cfg", "job")
    assert code == 2  # usage and config errors exit 2
    line = _assert_clean_error(err)
    assert "'method.lrr'" in line
    assert "lr_scheduler" in line
    assert "Finished" not in out


def test_unknown_key_without_cfg_flag(capsys, tmp_path):
    code, _, err = _run(capsys, "train", "method.optimizer.lrr=1", f"output_dir={tmp_path / 'x'}")
    assert code == 2  # usage and config errors exit 2
    line = _assert_clean_error(err)
    assert "'method.optimizer.lrr'" in line
    assert "'method.optimizer.lr'" in line
    assert not (tmp_path / "x").exists()


def test_unknown_flag(capsys):
    code, _, err = _run(capsys, "train", "--frobnicate")
    assert code == 2  # usage and config errors exit 2
    assert "--frobnicate" in _assert_clean_error(err)


def test_debug_shows_the_exception():
    from tunelab.errors import TunelabError

    with pytest.raises(TunelabError, match="method.lrr"):
        main(["train", "method.lrr=1", "--debug"])


def test_missing_data_file_names_the_path(capsys, tmp_path):
    missing = tmp_path / "missing" / "train.jsonl"
    code, out, err = _run(
        capsys,
        "train",
        "modelpool=CausalLMPool/tiny-llama",
        "fabric=cpu",
        f"output_dir={tmp_path / 'x'}",
        f"data.path={missing}",
        "progress_bar=false",
    )
    assert code == 1
    line = _assert_clean_error(err)
    assert str(missing) in line
    assert "data.path" in line
    assert "Finished" not in out


def test_missing_model_path_names_it(capsys, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"prompt": "p", "completion": "c"}) + "\n", encoding="utf-8")
    code, _, err = _run(
        capsys,
        "train",
        "modelpool.model_path=/nonexistent",
        "fabric=cpu",
        f"output_dir={tmp_path / 'x'}",
        f"data.path={data}",
        "progress_bar=false",
    )
    assert code == 1
    line = _assert_clean_error(err)
    assert "'/nonexistent'" in line
    assert "does not exist" in line


def test_both_limits_minus_one(capsys, tmp_path):
    code, _, err = _run(
        capsys,
        "train",
        "method.max_epochs=-1",
        "method.max_steps=-1",
        "fabric=cpu",
        f"output_dir={tmp_path / 'x'}",
        "data.path=whatever.jsonl",
    )
    assert code == 2  # a method's own option checks are config errors
    line = _assert_clean_error(err)
    assert "method.max_epochs" in line and "method.max_steps" in line
    assert "both -1" in line
    assert not (tmp_path / "x").exists()  # refused before anything was written


def test_heldout_loss_without_validation_split(capsys, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"prompt": "p", "completion": "c"}) + "\n", encoding="utf-8")
    code, _, err = _run(
        capsys,
        "train",
        "modelpool=CausalLMPool/tiny-llama",
        "taskpool=heldout-loss",
        "fabric=cpu",
        f"output_dir={tmp_path / 'x'}",
        f"data.path={data}",
        f"data.cache_dir={tmp_path}",
        "progress_bar=false",
    )
    assert code == 1
    line = _assert_clean_error(err)
    assert "data.val_fraction" in line and "taskpool=dummy" in line


def test_a_component_that_refuses_its_options_is_a_clear_error(tmp_path, capsys):
    from tunelab.cli.main import main

    data = tmp_path / "x.jsonl"  # a good file: the data checks run first, and this test is about the fabric
    data.write_text('{"prompt": "1 + 1?", "completion": "2"}\n')
    code = main(["train", "modelpool=CausalLMPool/tiny-llama", f"data.path={data}", f"output_dir={tmp_path / 'o'}",
                 "fabric=fsdp", "fabric.accelerator=cpu"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1 and "Could not build lightning.fabric.Fabric" in err and "only available on GPU" in err
    assert "Traceback" not in err


def test_an_unexpected_exception_becomes_one_paragraph(capsys, monkeypatch):
    import tunelab.cli.main as cli

    def broken(argv):
        raise KeyError("lost_key")

    monkeypatch.setitem(cli.COMMANDS, "data", broken)
    code, _, err = _run(capsys, "data", "stats", "x.jsonl")
    line = _assert_clean_error(err)
    assert code == 1 and "failed unexpectedly" in line and "KeyError" in line and "lost_key" in line and "--debug" in line
    with pytest.raises(KeyError):
        main(["data", "stats", "x.jsonl", "--debug"])


def test_an_os_error_names_the_path(capsys, monkeypatch, tmp_path):
    import tunelab.cli.main as cli

    def full_disk(argv):
        raise OSError(28, "No space left on device", str(tmp_path / "ckpt"))

    monkeypatch.setitem(cli.COMMANDS, "data", full_disk)
    code, _, err = _run(capsys, "data", "stats")
    line = _assert_clean_error(err)
    assert code == 1 and str(tmp_path / "ckpt") in line and "No space left" in line


def _train_args(tmp_path, data, *extra):
    return ["train", "modelpool=CausalLMPool/tiny-llama", "fabric=cpu", f"output_dir={tmp_path / 'run'}", f"data.path={data}",
            "data.prompt_field=question", "data.completion_field=answer", "progress_bar=false", *extra]  # fmt: skip


@pytest.mark.parametrize("validate", ["true", "false"])
def test_a_data_file_that_is_not_utf8_names_the_byte_and_line(capsys, tmp_path, validate):
    # Before: data.validate=false ended in a raw UnicodeDecodeError traceback.
    data = tmp_path / "train.json"
    data.write_bytes(b'[{"question": "caf\xe9?", "answer": "yes"}]\n')
    code, _, err = _run(capsys, *_train_args(tmp_path, data, f"data.validate={validate}"))
    line = _assert_clean_error(err)
    assert code == 1 and str(data) in line and "byte 18 (line 1)" in line and "UTF-8" in line and "iconv" in line


def test_a_binary_data_file_is_recognised(capsys, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_bytes(b"PK\x03\x04\x00\x00" + bytes(range(256)) * 4)
    code, _, err = _run(capsys, *_train_args(tmp_path, data, "data.validate=false"))
    line = _assert_clean_error(err)
    assert code == 1 and "binary file" in line and str(data) in line


def test_an_output_dir_that_is_a_file(capsys, tmp_path):
    # Before: FileExistsError traceback.
    data = tmp_path / "train.jsonl"
    data.write_text('{"question": "q", "answer": "a"}\n')
    (tmp_path / "run").write_text("not a folder")
    code, _, err = _run(capsys, *_train_args(tmp_path, data))
    line = _assert_clean_error(err)
    assert code == 1 and "is a file, not a folder" in line and (tmp_path / "run").read_text() == "not a folder"


def test_out_of_range_values_exit_2_before_anything_is_written(capsys, tmp_path):
    code, _, err = _run(capsys, "train", "method.optimizer.lr=-1", f"output_dir={tmp_path / 'x'}", "data.path=whatever.jsonl")
    line = _assert_clean_error(err)
    assert code == 2 and "'method.optimizer.lr'" in line and "positive" in line
    assert not (tmp_path / "x").exists()


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(capsys, tmp_path, monkeypatch):
    import tunelab.engine.checkpoint as checkpoint

    data = tmp_path / "train.jsonl"
    data.write_text("".join(f'{{"question": "q{i}", "answer": "a{i}"}}\n' for i in range(8)))
    real_save, calls = checkpoint._save_part, []

    def disk_full_on_the_second_checkpoint(part, folder):
        calls.append(folder)
        if len(calls) == 2:
            (folder / "model.safetensors").write_bytes(b"half a file")
            raise OSError(28, "No space left on device", str(folder / "model.safetensors"))
        real_save(part, folder)

    monkeypatch.setattr(checkpoint, "_save_part", disk_full_on_the_second_checkpoint)
    code, _, err = _run(capsys, *_train_args(tmp_path, data, "method.max_steps=2", "method.checkpoint_save_interval=step",
                                             "method.dataloader_kwargs.batch_size=4", "method.save_ckpt_type=hf"))  # fmt: skip
    line = _assert_clean_error(err)
    assert code == 1 and "No space left on device" in line and "model.safetensors" in line
    checkpoints = tmp_path / "run" / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step-000001"  # the first checkpoint is still the latest, whole
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(checkpoints / "step-000001")
    assert not (checkpoints / "step-000002").exists()
