"""Exports that are proven to compute what the trained model computed.

``export_merged``: an adapter (LoRA and every family peft can merge) folded into its base, saved as
a plain transformers folder (safetensors, tokenizer with its chat template, generation config);
a QLoRA adapter is merged into the dequantized 4-bit base it was trained on. ``export_gguf``: a
Llama-family model as one GGUF file (``deploy.gguf``), or a LoRA adapter as a GGUF adapter file.

Every export is verified unless told not to (``deploy.verify``): the export and its source run on
the same texts and the report (largest logit difference, perplexities, greedy agreement) is kept
beside it (``export.json``, or ``OUT.gguf.json``). Outputs are written under a temporary name and
renamed into place, so a crash leaves nothing half-written at the output path; an export that
fails verification is kept under ``OUT.unverified`` and the call reports failure.
"""

import copy
import json
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tunelab.errors import TunelabError, UsageError

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ExportResult:
    kind: str  # merged | gguf | gguf-adapter
    path: Path  # where the export is (OUT, or OUT.unverified when verification failed)
    source: str
    number_format: str
    verification: dict | None = None  # Verification.as_dict(), None with --no-verify
    checks: dict = field(default_factory=dict)  # further readers (transformers' GGUF loader, llama.cpp)

    @property
    def passed(self) -> bool:
        reports = [self.verification] + [c for c in self.checks.values() if isinstance(c, dict) and "passed" in c]
        return all(r is None or r["passed"] for r in reports)

    def as_dict(self) -> dict:
        return {"kind": self.kind, "path": str(self.path), "source": self.source, "number_format": self.number_format,
                "passed": self.passed, "verification": self.verification, "checks": self.checks}  # fmt: skip


def check_output(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise UsageError(f"The output '{out}' already exists. Choose another path, or pass --overwrite to replace it.")
    if not out.parent.exists():
        out.parent.mkdir(parents=True, exist_ok=True)


@contextmanager
def staged(out: Path):
    """Yield a temporary path beside ``out``; on success it replaces ``out``; on any error it is
    removed, and ``out`` is as it was."""
    temporary = out.parent / f".{out.name}.partial-{os.getpid()}"
    _remove(temporary)
    try:
        yield temporary
    except BaseException:
        _remove(temporary)
        raise


def destination(out: Path, passed: bool) -> Path:
    """Where a finished export goes: ``out``, or ``out.unverified`` when it failed verification."""
    return out if passed else out.with_name(out.name + ".unverified")


def place(temporary: Path, out: Path, target: Path) -> None:
    """Move a finished export to ``target``, replacing whatever an earlier export left at ``out``."""
    for stale in (out, destination(out, passed=False)):
        _remove(stale)
    temporary.rename(target)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def load_source(source: str, base: str | None = None):
    """The model an export starts from, as ``tunelab eval`` resolves it: a run folder, a checkpoint,
    an adapter folder of a tunelab run (its config names the base), a model folder, a shipped pool
    name; or a peft adapter folder ``source`` on the model ``base``. Returns a ``LocalModel`` on the
    CPU in float32."""
    from tunelab.evaluation.models import _adapter_folder as is_adapter, load_eval_model

    if base:
        return load_eval_model(base, adapter=source, dtype="float32", device="cpu")
    path = Path(source)
    if path.is_dir() and is_adapter(path) and not (path / "config.yaml").is_file():
        named = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path") if (path / "adapter_config.json").is_file() else None
        raise UsageError(
            f"'{source}' is an adapter without the config.yaml of a tunelab run, so its base is unknown: give the model it was "
            f"trained on with --base MODEL (a model folder, .gguf or shipped pool name){f'; its adapter_config.json names {named!r}' if named else ''}."
        )
    return load_eval_model(source, dtype="float32", device="cpu")


def is_adapter_model(model) -> bool:
    return hasattr(model, "merge_and_unload") and hasattr(model, "peft_config")


def merge(model) -> torch.nn.Module:
    """A merged copy of an adapter model (the source stays as it is, for verification); a plain model
    is copied as it is. Families that cannot be merged are refused by name."""
    from tunelab.models.bottleneck import BottleneckAdapterModel

    if isinstance(model, BottleneckAdapterModel):
        raise TunelabError(
            "This model carries tunelab bottleneck adapters: they add layers of their own and cannot be merged into the base weights. "
            "Serve the base with the adapter folder (tunelab eval/serve take --adapter), or train a LoRA-family adapter to merge."
        )
    if not is_adapter_model(model):
        return copy.deepcopy(model)
    config = next(iter(model.peft_config.values()))
    kind = str(getattr(config, "peft_type", "")).split(".")[-1]
    if kind in ("PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING"):
        raise TunelabError(f"A {kind.lower()} adapter adds virtual tokens instead of changing weights, so it cannot be merged into the base.")
    return copy.deepcopy(model).merge_and_unload()


def quantized_run(source: str):
    """(the base's model pool with its quantization, the adapter folder) when ``source`` is a tunelab
    run or checkpoint of an adapter trained on a quantized base (QLoRA, 8-bit); else None."""
    from omegaconf import OmegaConf

    from tunelab.config import instantiate
    from tunelab.evaluation.models import _adapter_folder as is_adapter, _run_checkpoint

    path = Path(source)
    if not path.is_dir():
        return None
    checkpoint = _run_checkpoint(path) or path
    config = checkpoint / "config.yaml"
    if not (is_adapter(checkpoint) and config.is_file()):
        return None
    pool = OmegaConf.load(config).get("modelpool")
    if pool is None or not pool.get("quantization"):
        return None
    return instantiate(OmegaConf.to_container(pool, resolve=False)), checkpoint


def load_quantized_source(pool, adapter: Path):
    """The model as it was trained: the quantized base with the adapter on it (on the CPU)."""
    from peft import PeftModel

    from tunelab.evaluation.models import LocalModel

    tokenizer = pool.load_tokenizer()
    base = pool.load_model(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    return LocalModel(PeftModel.from_pretrained(base, adapter).eval(), tokenizer, f"{adapter} (on the {pool.quantization} base)", device="cpu")


def dequantized_merge(quantized, pool, adapter: Path) -> torch.nn.Module:
    """QLoRA: the base's quantized weights dequantized into a full-precision copy of the model,
    the adapter put on that copy and merged, so the merged model is what was trained (the
    quantized base plus the adapter), not the adapter on weights it never saw."""
    import bitsandbytes as bnb
    from peft import PeftModel

    full_pool = copy.copy(pool)
    full_pool.quantization = None
    tokenizer = pool.load_tokenizer()
    torch.manual_seed(0)
    full = full_pool.load_model(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    modules = dict(full.named_modules())
    replaced = 0
    for name, module in quantized.get_base_model().named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, bnb.nn.Linear4bit):
            values = bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
        elif isinstance(module, bnb.nn.Linear8bitLt):
            values = bnb.functional.int8_vectorwise_dequant(weight.data, weight.SCB)
        else:
            continue
        target = modules[name.removeprefix("base_model.model.").removesuffix(".base_layer")]  # peft wraps each adapted layer
        with torch.no_grad():
            target.weight.copy_(values.to(target.weight.dtype).reshape(target.weight.shape))
        replaced += 1
    if not replaced:
        raise TunelabError(f"'{adapter}' was trained on a {pool.quantization} base, but no quantized layer was found to dequantize.")
    log.info("Dequantized %d %s layers of the base; merging the adapter into them", replaced, pool.quantization)
    return PeftModel.from_pretrained(full, adapter).merge_and_unload()


def source_and_merged(source: str, base: str | None):
    """(the source as it was trained, its merged copy, the quantized pool and adapter or None)."""
    quantized = None if base else quantized_run(source)
    if quantized is not None:  # QLoRA: compared with what was trained, merged into the dequantized base
        loaded = load_quantized_source(*quantized)
        return loaded, dequantized_merge(loaded.model, *quantized), quantized
    loaded = load_source(source, base)
    return loaded, merge(loaded.model), None


def judged_as(number_format: str, quantized) -> str:
    """A quantized source computes in bfloat16 (QLoRA's compute type): an export of it in a finer
    format is judged at bfloat16's tolerance."""
    return "bfloat16" if quantized is not None and number_format in ("float32", "float16", "f32", "f16") else number_format


def export_merged(source: str, out: str | Path, base: str | None = None, dtype: str = "float32", verify: bool = True,
                  verify_data: str | None = None, verify_start: int | None = None, verify_limit: int | None = None,
                  overwrite: bool = False) -> ExportResult:  # fmt: skip
    """Merge ``source``'s adapter into its base and save a transformers folder at ``out``."""
    if dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype} is not one of: {', '.join(DTYPES)}.")
    out = Path(out)
    check_output(out, overwrite)
    loaded, merged, quantized = source_and_merged(source, base)
    merged = merged.to(DTYPES[dtype])
    number_format = judged_as(dtype, quantized)
    with staged(out) as temporary:
        merged.save_pretrained(temporary, safe_serialization=True)
        loaded.tokenizer.save_pretrained(temporary)
        del merged
        result = ExportResult("merged", out, loaded.name, dtype)
        if quantized is not None:
            result.checks["base"] = {"quantization": quantized[0].quantization, "merged_into": "the dequantized base", "judged_as": number_format}
        if verify:
            from transformers import AutoModelForCausalLM

            from tunelab.deploy.verify import TransformersScorer, verification_texts, verify as run_verification

            texts = verification_texts(loaded.tokenizer, verify_data, verify_start, verify_limit)
            exported = AutoModelForCausalLM.from_pretrained(temporary, dtype=torch.float32)
            report = run_verification(_source_scorer(loaded), TransformersScorer(exported, str(out), loaded.eos_token_ids), texts, number_format)
            result.verification = report.as_dict()
            log.info("%s", report.summary())
        result.path = destination(out, result.passed)
        (temporary / "export.json").write_text(json.dumps(result.as_dict(), indent=2))
        place(temporary, out, result.path)
    return result


def _source_scorer(loaded):
    from tunelab.deploy.verify import TransformersScorer

    return TransformersScorer(loaded.model, loaded.name, loaded.eos_token_ids)


def llama_cpp_check(source, gguf_file: Path, texts, number_format: str, adapter: Path | None = None, name: str = "", tokenizer=None) -> dict:
    """The GGUF as llama.cpp runs it against the source: the verification report, whether llama.cpp
    splits the texts into the same tokens, and its greedy answer to the first chat through the
    GGUF's own chat template. ``{"skipped": why}`` without the binding."""
    from tunelab.deploy import llama_cpp
    from tunelab.deploy.verify import verify as run_verification

    why = llama_cpp.available()
    if why:
        log.warning("Not verified with llama.cpp: %s", why)
        return {"skipped": why}
    longest = max(len(t.ids) for t in texts) + 64
    scorer = llama_cpp.LlamaCppScorer(gguf_file, adapter=adapter, context=max(512, longest), name=name or str(gguf_file))
    report = run_verification(source, scorer, texts, number_format)
    log.info("llama.cpp: %s", report.summary())
    check = report.as_dict()
    if tokenizer is not None:
        same = sum(scorer.tokenize(t.text) == tokenizer(t.text, add_special_tokens=False)["input_ids"] for t in texts if t.text)
        check["tokenizer_identical"] = f"{same}/{sum(1 for t in texts if t.text)}"
        check["passed"] = check["passed"] and same == sum(1 for t in texts if t.text)
    chat = next((t.messages for t in texts if t.messages), None)
    if chat:
        question = [m for m in chat if m["role"] != "assistant"]
        check["chat"] = {"question": question[-1]["content"], "answer": scorer.chat(question, max_tokens=200)}
    del scorer
    return check


def export_gguf(source: str, out: str | Path, number_format: str = "f16", base: str | None = None, verify: bool = True,
                verify_data: str | None = None, verify_start: int | None = None, verify_limit: int | None = None,
                llama_cpp: bool | None = None, overwrite: bool = False) -> ExportResult:  # fmt: skip
    """``source`` (with its adapter merged, if it has one) as one GGUF file at ``out``, verified with
    transformers' GGUF loader and, when the binding is installed (or ``llama_cpp=True`` demands
    it), with llama.cpp."""
    from tunelab.deploy.gguf import NUMBER_FORMATS, check_architecture, write_model_gguf

    if number_format not in NUMBER_FORMATS:
        raise UsageError(f"--type {number_format} is not one tunelab writes; choose one of: {', '.join(NUMBER_FORMATS)}.")
    out = Path(out)
    check_output(out, overwrite)
    loaded, merged, quantized = source_and_merged(source, base)
    check_architecture(loaded.model.config, f"'{source}'")
    if llama_cpp:
        from tunelab.deploy.llama_cpp import available

        if available():
            raise UsageError(f"--llama-cpp asks for verification with llama.cpp, but {available()}.")
    result = ExportResult("gguf", out, loaded.name, number_format)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.merged-") as merged_dir, staged(out) as temporary:
        merged.save_pretrained(merged_dir, safe_serialization=True)
        loaded.tokenizer.save_pretrained(merged_dir)
        del merged
        result.checks["written"] = write_model_gguf(Path(merged_dir), temporary, number_format, name=out.stem)
        if verify:
            from transformers import AutoModelForCausalLM

            from tunelab.deploy.verify import TransformersScorer, verification_texts, verify as run_verification

            texts = verification_texts(loaded.tokenizer, verify_data, verify_start, verify_limit)
            source_scorer = _source_scorer(loaded)
            reread = AutoModelForCausalLM.from_pretrained(str(temporary.parent), gguf_file=temporary.name, dtype=torch.float32)
            judged = judged_as(number_format, quantized)
            report = run_verification(source_scorer, TransformersScorer(reread, f"{out} (transformers' GGUF loader)", loaded.eos_token_ids), texts, judged)
            log.info("transformers' GGUF loader: %s", report.summary())
            result.verification = report.as_dict()
            del reread
            if llama_cpp is not False:
                result.checks["llama_cpp"] = llama_cpp_check(source_scorer, temporary, texts, judged, name=f"{out} (llama.cpp)", tokenizer=loaded.tokenizer)
        result.path = destination(out, result.passed)
        place(temporary, out, result.path)
    _sidecar(result)
    return result


def _sidecar(result: ExportResult) -> Path:
    """The export's report beside a single-file export (``OUT.gguf.json``)."""
    path = result.path.with_name(result.path.name + ".json")
    path.write_text(json.dumps(result.as_dict(), indent=2))
    return path


def _adapter_folder(source: str) -> Path:
    from tunelab.evaluation.models import _adapter_folder as is_adapter, _run_checkpoint

    path = Path(source)
    checkpoint = (_run_checkpoint(path) or path) if path.is_dir() else path
    if not is_adapter(checkpoint):
        raise UsageError(f"--adapter writes a LoRA adapter as a llama.cpp adapter file, but '{source}' is not an adapter folder, nor a "
                         "run or checkpoint whose weights are one. Drop --adapter to export the whole model.")  # fmt: skip
    return checkpoint


def export_adapter_gguf(source: str, out: str | Path, base: str | None = None, number_format: str = "f32", base_gguf: str | None = None,
                        verify: bool = True, verify_data: str | None = None, verify_start: int | None = None,
                        verify_limit: int | None = None, overwrite: bool = False) -> ExportResult:  # fmt: skip
    """A LoRA adapter (``source``: an adapter folder, or a tunelab run or checkpoint holding one; ``base``
    for a peft adapter that is not from a tunelab run)
    as a GGUF adapter file for llama.cpp (``--lora OUT``). Verified with llama.cpp on the base's GGUF
    (``base_gguf``, or the base written to a temporary f32 GGUF) against base + adapter in
    transformers."""
    from tunelab.deploy.gguf import write_adapter_gguf, write_model_gguf

    out = Path(out)
    check_output(out, overwrite)
    folder = _adapter_folder(source)
    loaded = load_source(source, base)
    if not is_adapter_model(loaded.model):
        raise UsageError(f"'{folder}' did not load as a peft adapter; a llama.cpp adapter file is written from a LoRA adapter.")
    result = ExportResult("gguf-adapter", out, loaded.name, number_format)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.base-") as work, staged(out) as temporary:
        result.checks["written"] = write_adapter_gguf(folder, loaded.model.config, temporary, number_format)
        if verify:
            from tunelab.deploy import llama_cpp
            from tunelab.deploy.verify import verification_texts

            why = llama_cpp.available()
            if why:
                result.checks["llama_cpp"] = {"skipped": why}
                log.warning("The adapter file is not verified: %s", why)
            else:
                base_file = Path(base_gguf) if base_gguf else Path(work) / "base-f32.gguf"
                if not base_gguf:
                    base = copy.deepcopy(loaded.model).unload()
                    base.save_pretrained(Path(work) / "base", safe_serialization=True)
                    loaded.tokenizer.save_pretrained(Path(work) / "base")
                    write_model_gguf(Path(work) / "base", base_file, "f32")
                texts = verification_texts(loaded.tokenizer, verify_data, verify_start, verify_limit)
                check = llama_cpp_check(_source_scorer(loaded), base_file, texts, number_format,
                                        adapter=temporary, name=f"{base_file.name} + {out.name} (llama.cpp)")  # fmt: skip
                result.verification = {k: v for k, v in check.items() if k != "chat"}
                result.checks["llama_cpp"] = {"base_gguf": str(base_file) if base_gguf else "the base, written as f32 for the check",
                                              "chat": check.get("chat")}  # fmt: skip
        result.path = destination(out, result.passed)
        place(temporary, out, result.path)
    _sidecar(result)
    return result


# ----------------------------------------------------------------------------- at the end of training
def _parse_target(target: str) -> tuple[str, str]:
    kind, _, option = str(target).partition(":")
    return kind, option


def check_export_targets(targets: list, save_ckpt_type: str) -> None:
    """``method.export`` before anything loads: known targets, and checkpoints an export can read."""
    from tunelab.deploy.gguf import NUMBER_FORMATS

    for target in targets:
        kind, option = _parse_target(target)
        ok = (kind == "merged" and option in ("", *DTYPES)) or (kind == "gguf" and option in ("", *NUMBER_FORMATS)) or (
            kind == "adapter-gguf" and option in ("", "f32", "f16", "bf16"))  # fmt: skip
        if not ok:
            raise UsageError(
                f"method.export: '{target}' is not an export; use merged (merged:bfloat16, merged:float16), gguf (gguf:q8_0, "
                f"gguf:{'|'.join(NUMBER_FORMATS)}) or adapter-gguf, e.g. method.export=[merged,gguf:q8_0]."
            )
    if save_ckpt_type == "lightning":
        raise UsageError(
            "method.export reads the final checkpoint as transformers or peft save it; set method.save_ckpt_type=hf "
            "(full fine-tuning) or method.save_ckpt_type=peft (adapters)."
        )


def export_after_training(checkpoint: Path, folder: Path, targets: list) -> list[dict]:
    """``method.export``: each target exported from the run's final checkpoint into ``folder`` and
    verified on the shipped texts; the reports, in order. A failed export is reported, not raised:
    the training it follows is finished and kept."""
    reports = []
    for target in targets:
        kind, option = _parse_target(target)
        try:
            if kind == "merged":
                result = export_merged(str(checkpoint), folder / ("merged" + (f"-{option}" if option else "")), dtype=option or "float32", overwrite=True)
            elif kind == "gguf":
                result = export_gguf(str(checkpoint), folder / f"model-{option or 'f16'}.gguf", option or "f16", overwrite=True)
            else:
                result = export_adapter_gguf(str(checkpoint), folder / f"adapter-{option or 'f32'}.gguf", number_format=option or "f32", overwrite=True)
        except TunelabError as error:
            log.error("method.export %s failed: %s", target, error)
            reports.append({"target": target, "passed": False, "error": str(error)})
            continue
        (log.info if result.passed else log.error)("method.export %s: %s at %s", target, "verified" if result.passed else "FAILED verification", result.path)
        reports.append({"target": target} | result.as_dict())
    return reports
