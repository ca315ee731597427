"""lm-evaluation-harness (``lm_eval``) on a model tunelab has loaded: ``tunelab eval lm-eval``.

The loaded model and tokenizer go to lm_eval's ``HFLM`` as objects, so whatever tunelab can load
(a GGUF file, a run folder, a base with a peft adapter) runs lm_eval's tasks unchanged, with no
second copy in memory. Tasks read local files only: the call runs with the Hugging Face Hub and
datasets offline, and task names resolve against the include path and tunelab's shipped tasks
(``configs/lm_eval``), never lm_eval's own catalogue, whose tasks download their data.

A shipped task reads a data file given at run time: ``local_task`` writes a copy of its YAML with
the file filled in, into the output folder (so the run records the task it ran) or a temporary one.

lm_eval is an optional dependency (``pip install 'tunelab[lmeval]'``) and is imported on use.
"""

import json
import os
import re
import tempfile
import time
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tunelab.config import CONFIG_DIR
from tunelab.errors import TunelabError

SHIPPED_TASKS_DIR = CONFIG_DIR / "lm_eval"


def shipped_tasks() -> dict[str, Path]:
    """Task name -> YAML of the lm_eval tasks tunelab ships (each reads a data file given at run time)."""
    return {p.stem: p for p in sorted(SHIPPED_TASKS_DIR.glob("*.yaml"))}


def _import_lm_eval():
    try:
        import lm_eval
        import lm_eval.tasks
    except ImportError as err:
        raise TunelabError(
            f"tunelab eval lm-eval runs lm-evaluation-harness, which cannot be imported ({err}): "
            "pip install 'tunelab[lmeval]' (or pip install lm-eval)."
        ) from None
    return lm_eval


@contextmanager
def _offline():
    """No request to the Hugging Face Hub, also from modules that read the switches at import time."""
    import datasets.config
    import huggingface_hub.constants

    switches = [(huggingface_hub.constants, "HF_HUB_OFFLINE"), (datasets.config, "HF_HUB_OFFLINE"), (datasets.config, "HF_DATASETS_OFFLINE")]
    saved_attrs = [(module, name, getattr(module, name)) for module, name in switches]
    saved_env = {key: os.environ.get(key) for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    os.environ.update({key: "1" for key in saved_env})
    for module, name in switches:
        setattr(module, name, True)
    try:
        yield
    finally:
        for module, name, value in saved_attrs:
            setattr(module, name, value)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# ----------------------------------------------------------------------------- tasks
def _first_record(path: Path) -> dict | None:
    """The first record of a JSON lines file (None for another layout: datasets will judge it)."""
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    return None
                return record if isinstance(record, dict) else None
    raise TunelabError(f"Data file '{path}' is empty; the task has no rows to evaluate.")


def _fields(config: dict) -> set[str]:
    """The record fields a task's Jinja prompt and target read (``{{question}}``, ``{{answer.split(...)}}``)."""
    text = " ".join(str(config.get(key) or "") for key in ("doc_to_text", "doc_to_target"))
    return set(re.findall(r"\{\{\s*([A-Za-z_]\w*)", text))


def local_task(task_yaml: str | Path, data_file: str | Path, out_folder: str | Path) -> str:
    """Write ``task_yaml`` into ``out_folder`` with ``data_file`` as its test split's data, and
    return the folder (an include path for lm_eval's TaskManager)."""
    import yaml

    data = Path(data_file).expanduser().resolve()
    if not data.is_file():
        raise TunelabError(f"--data '{data_file}' does not exist. Give a JSON lines file (for gsm8k_local: rows with question and answer).")
    config = yaml.safe_load(Path(task_yaml).read_text(encoding="utf-8"))
    record = _first_record(data)
    missing = sorted(_fields(config) - set(record)) if record is not None else []
    if missing:
        raise TunelabError(
            f"--data '{data_file}': task '{config['task']}' reads the fields {', '.join(sorted(_fields(config)))}, "
            f"but its first row lacks {', '.join(missing)} (it has {', '.join(record) or 'no fields'})."
        )
    split = config.get("test_split") or "test"
    config.setdefault("dataset_kwargs", {})["data_files"] = {split: str(data)}
    out = Path(out_folder)
    out.mkdir(parents=True, exist_ok=True)
    header = f"# {Path(task_yaml).name} as tunelab ran it, on {data}\n"
    (out / Path(task_yaml).name).write_text(header + yaml.safe_dump(config, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return str(out)


def _include_paths(include_path) -> list[str]:
    paths = [] if include_path is None else [include_path] if isinstance(include_path, (str, Path)) else list(include_path)
    for path in paths:
        if not Path(path).is_dir():
            raise TunelabError(f"--include-path '{path}' is not a folder. Give the folder that holds your lm_eval task YAML files.")
    return [str(p) for p in paths]


def check_tasks(tasks: list[str], include_path=None, data_file: str | None = None) -> None:
    """Fail before the model loads: lm_eval missing, a task name neither shipped nor in the include
    path, a shipped task without its data file (or a data file no task reads)."""
    lm_eval = _import_lm_eval()
    if not tasks:
        raise TunelabError(f"--tasks names no task. Shipped tasks: {', '.join(shipped_tasks())}.")
    paths = _include_paths(include_path)
    shipped = [t for t in tasks if t in shipped_tasks()]
    if shipped and data_file is None:
        raise TunelabError(f"Task {', '.join(shipped)} reads the data file you give: --data FILE (JSON lines; gsm8k_local: rows with question and answer).")
    if data_file is not None and not shipped:
        raise TunelabError(f"--data feeds tunelab's shipped tasks ({', '.join(shipped_tasks())}), and --tasks names none of them; a task of --include-path names its own data files.")
    if data_file is not None and not Path(data_file).expanduser().is_file():
        raise TunelabError(f"--data '{data_file}' does not exist. Give a JSON lines file (for gsm8k_local: rows with question and answer).")
    known = set(lm_eval.tasks.TaskManager(include_path=paths, include_defaults=False).all_tasks) if paths else set()
    unknown = [t for t in tasks if t not in known and t not in shipped_tasks() and not Path(t).is_file()]
    if unknown:
        found = sorted(known | set(shipped_tasks()))
        raise TunelabError(
            f"Unknown lm_eval task {', '.join(unknown)}. Tasks found: {', '.join(found)} "
            f"({'in ' + ', '.join(paths) + ' and ' if paths else ''}shipped with tunelab). lm_eval's own tasks "
            "(gsm8k, hellaswag, mmlu, ...) download their data from the Hugging Face Hub, which this command does "
            "not reach: copy a task's YAML into an --include-path folder with dataset_path: json and "
            "dataset_kwargs.data_files pointing at local files, or use gsm8k_local with --data FILE for GSM8K."
        )


# ----------------------------------------------------------------------------- report
@dataclass
class LmEvalScore:
    task: str
    metric: str
    filter: str
    value: float
    stderr: float | None
    samples: int


@dataclass
class LmEvalReport:
    model: str
    tasks: list[str]
    scores: list[LmEvalScore]
    seconds: float
    settings: dict
    lm_eval_version: str
    output_dir: str | None = None
    results: dict = field(default_factory=dict, repr=False)  # lm_eval's own results (without samples)

    def render(self) -> str:
        options = ", ".join(f"{k} {v}" for k, v in self.settings.items() if v not in (None, False))
        lines = [f"{self.model}: lm-evaluation-harness {self.lm_eval_version} ({options})",
                 f"  {'task':<20} {'metric':<14} {'filter':<18} {'n':>5} {'value':>8} {'stderr':>8}"]  # fmt: skip
        for s in self.scores:
            stderr = f"{s.stderr:8.4f}" if isinstance(s.stderr, float) else f"{'-':>8}"
            lines.append(f"  {s.task:<20} {s.metric:<14} {s.filter:<18} {s.samples:>5} {s.value:8.4f} {stderr}")
        lines.append(f"  {self.seconds:.1f} s")
        if self.output_dir:
            lines.append(f"  results: {Path(self.output_dir) / 'results.json'}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k not in ("results", "scores")}
        out["scores"] = [asdict(s) for s in self.scores]
        return out


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _scores(results: dict) -> list[LmEvalScore]:
    """One row per (task, metric, filter) of lm_eval's ``results["results"]`` ("metric,filter" keys)."""
    scores = []
    for task, metrics in results["results"].items():
        samples = results.get("n-samples", {}).get(task, {}).get("effective", 0)
        for key, value in metrics.items():
            metric, _, filter_name = key.partition(",")
            if not filter_name or metric.endswith("_stderr") or _number(value) is None:
                continue  # alias, name, sample_len: not scores
            stderr = _number(metrics.get(f"{metric}_stderr,{filter_name}"))
            scores.append(LmEvalScore(task, metric, filter_name, float(value), stderr, samples))
    return scores


def _write(results: dict, folder: Path) -> None:
    from lm_eval.utils import handle_non_serializable

    from tunelab.resources import atomic_write_text

    folder.mkdir(parents=True, exist_ok=True)
    samples = results.pop("samples", {})
    atomic_write_text(folder / "results.json", json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False))
    for task, rows in samples.items():  # a row per document and filter: prompt, target, reply, extracted answer, score
        text = "".join(json.dumps(row, default=handle_non_serializable, ensure_ascii=False) + "\n" for row in rows)
        atomic_write_text(folder / f"samples_{task}.jsonl", text)


# ----------------------------------------------------------------------------- run
def run_lm_eval(
    model, tasks: list[str], include_path=None, limit: int | None = None, batch_size: int = 8, num_fewshot: int | None = None,
    output_dir=None, gen_kwargs: str | None = None, apply_chat_template: bool = False, data_file: str | None = None,
) -> LmEvalReport:  # fmt: skip
    """Run lm_eval ``tasks`` on a ``LocalModel``. ``include_path``: a folder (or a list) of task
    YAMLs; ``data_file``: the data of a shipped task (gsm8k_local); ``gen_kwargs``: lm_eval's
    override string (``max_gen_toks=64``). With ``output_dir``: results.json, samples_TASK.jsonl
    (every prompt, reply and score) and the task YAMLs that ran, under tasks/."""
    from tunelab.data.tokenize import FALLBACK_CHAT_TEMPLATE
    from tunelab.evaluation.models import LocalModel

    if not isinstance(model, LocalModel):
        raise TunelabError(f"lm-eval runs on a model loaded in this process; {model.name} is an endpoint. Run lm_eval's own local-chat-completions model against it.")
    if limit is not None and limit < 1:
        raise TunelabError(f"--limit {limit} must be at least 1.")
    if batch_size < 1:
        raise TunelabError(f"--batch-size {batch_size} must be at least 1.")
    check_tasks(tasks, include_path, data_file)
    lm_eval = _import_lm_eval()
    from lm_eval.models.huggingface import HFLM

    with ExitStack() as stack:
        paths = _include_paths(include_path)
        shipped = shipped_tasks()
        if any(t in shipped for t in tasks):
            folder = Path(output_dir) / "tasks" if output_dir is not None else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tunelab-lm-eval-")))
            for name in {t for t in tasks if t in shipped}:
                local_task(shipped[name], data_file, folder)
            paths.append(str(folder))
        tokenizer = model.tokenizer
        lm = HFLM(
            pretrained=model.model, tokenizer=tokenizer, batch_size=batch_size,
            # As tunelab's own generation: a rendered chat prompt is encoded without added special
            # tokens (the template writes any BOS itself); a raw prompt gets the tokenizer's default.
            add_bos_token=False if apply_chat_template else None,
            chat_template_args={"chat_template": FALLBACK_CHAT_TEMPLATE} if apply_chat_template and not tokenizer.chat_template else None,
        )  # fmt: skip
        began = time.perf_counter()
        with _offline():
            results = lm_eval.simple_evaluate(
                model=lm, tasks=list(tasks), task_manager=lm_eval.tasks.TaskManager(include_path=paths, include_defaults=False),
                limit=limit, batch_size=batch_size, num_fewshot=num_fewshot, gen_kwargs=gen_kwargs or None,
                apply_chat_template=apply_chat_template, log_samples=output_dir is not None,
            )  # fmt: skip
        seconds = time.perf_counter() - began
    settings = {"limit": limit, "batch_size": batch_size, "num_fewshot": num_fewshot, "gen_kwargs": gen_kwargs,
                "chat_template": apply_chat_template, "data": str(data_file) if data_file else None}  # fmt: skip
    report = LmEvalReport(model.name, list(tasks), _scores(results), seconds, settings, lm_eval.__version__, results=results)
    if output_dir is not None:
        _write(results, Path(output_dir))
        report.output_dir = str(output_dir)
    return report
