"""`tunelab export` through the real command line: reports, exit codes, refusals."""

import json

import torch

from tests.deploy.test_export_merge import lora_adapter, tiny_folder
from tunelab.cli.main import main


def test_export_help_lists_the_commands(capsys):
    assert main(["export", "--help"]) == 0
    out = capsys.readouterr().out
    assert "merge" in out and "gguf" in out and "OUT.unverified" in out


def test_merge_then_gguf_print_their_verification_and_exit_0(tokenizer, tmp_path, capsys):
    tiny_folder(tmp_path / "base", tokenizer, tied=True)
    lora_adapter(tmp_path / "base", tmp_path / "adapter")
    assert main(["export", "merge", str(tmp_path / "adapter"), "--base", str(tmp_path / "base"), "-o", str(tmp_path / "merged"),
                 "--verify-limit", "4", "--json", str(tmp_path / "merge.json")]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "verification: passed on 4 texts" in out and "greedy continuations identical 4/4" in out
    assert json.loads((tmp_path / "merge.json").read_text())["passed"] is True
    assert main(["export", "gguf", str(tmp_path / "merged"), "-o", str(tmp_path / "m.gguf"), "--type", "q8_0", "--no-llama-cpp",
                 "--verify-limit", "4"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "transformers' GGUF loader: passed" in out and '"Q8_0": 15' in out


def test_a_failed_verification_exits_1_and_says_where_the_export_is(tokenizer, tmp_path, capsys, monkeypatch):
    import tunelab.deploy.export as export

    tiny_folder(tmp_path / "base", tokenizer, tied=True)
    lora_adapter(tmp_path / "base", tmp_path / "adapter")
    real = export.merge

    def broken(model):
        merged = real(model)
        with torch.no_grad():
            merged.model.norm.weight.mul_(1.5)
        return merged

    monkeypatch.setattr(export, "merge", broken)
    assert main(["export", "merge", str(tmp_path / "adapter"), "--base", str(tmp_path / "base"), "-o", str(tmp_path / "merged"),
                 "--verify-limit", "2"]) == 1  # fmt: skip
    out = capsys.readouterr().out
    assert "FAILED" in out and f"kept at {tmp_path / 'merged.unverified'}" in out
    assert main(["export", "merge", str(tmp_path / "adapter"), "-o", str(tmp_path / "x")]) == 2
    assert "--base MODEL" in capsys.readouterr().err
