"""`method.export`: a LoRA run exports its final checkpoint, verified, and summary.json says what and how well."""

import json

import pytest

from tests.engine.test_trainer import overrides as trainer_overrides
from tunelab.config import compose_config
from tunelab.engine import train
from tunelab.errors import UsageError


def overrides(out, *extra):
    return [o for o in trainer_overrides(out, *extra) if not o.startswith("method.lr_scheduler")]


def test_a_lora_run_exports_a_merged_folder_and_a_gguf_and_records_them(tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    cfg = compose_config(overrides(out, "method=lm_finetune/peftfinetune_sft", "method.max_steps=2", "method.save_ckpt_type=peft",
                                   "method.export=[merged,gguf:q8_0]", "taskpool=dummy"))  # fmt: skip
    result = train(cfg)
    summary = json.loads((out / "summary.json").read_text())
    exports = {e["target"]: e for e in summary["exports"]}
    assert [e["target"] for e in result.exports] == ["merged", "gguf:q8_0"]
    assert exports["merged"]["passed"] and exports["merged"]["path"] == str(out / "export/merged")
    assert exports["merged"]["verification"]["max_logit_difference"] < 1e-3
    assert exports["gguf:q8_0"]["passed"] and exports["gguf:q8_0"]["checks"]["written"]["tensor_types"]["Q8_0"] > 0
    assert AutoModelForCausalLM.from_pretrained(out / "export/merged") is not None
    assert (out / "export/model-q8_0.gguf").stat().st_size > 1000


@pytest.mark.parametrize(
    "extra, message",
    [(("method.export=[onnx]",), "'onnx' is not an export; use merged"),
     (("method.export=[merged]",), "save_ckpt_type=hf .*or method.save_ckpt_type=peft"),
     (("method=lm_finetune/bradley_terry_rm", "method.export=[merged]"), "a reward model is a sequence classifier")],
)  # fmt: skip
def test_export_options_that_cannot_work_are_refused_before_training(tmp_path, extra, message):
    from tunelab.errors import TunelabError

    with pytest.raises((UsageError, TunelabError), match=message):
        train(compose_config(overrides(tmp_path / "run", *extra)))
    assert not (tmp_path / "run" / "summary.json").exists()
