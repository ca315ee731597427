"""The engine: one Lightning Fabric loop that runs every method the same way.

``train(cfg)`` builds the parts of a run (fabric, model pool, method, data, task pool) and calls
``fit``, the loop itself: step, accumulate, clip, schedule, log, evaluate, checkpoint.
"""

import json
import logging
import math
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from tunelab.config import DataConfig, instantiate, replace_placeholder, validate_config
from tunelab.data import ResumableSampler, real_tokens
from tunelab.data.mixture import realised_mix
from tunelab.data.validate import check_before_training, describe_warnings, training_refusal
from tunelab.engine.allocator import DEFAULT_MMAP_THRESHOLD, QUANTIZED_MMAP_THRESHOLD, tune_cpu_allocator
from tunelab.engine.checkpoint import TrainState, atomic_write_text, load_checkpoint, resolve_checkpoint, save_checkpoint
from tunelab.engine.method import LossResult, Method
from tunelab.engine.metrics import MetricsCSV, plot_loss_curve
from tunelab.errors import TunelabError, UsageError
from tunelab.evaluation import TaskPool
from tunelab.planning import measure_matmul_tflops, measured_peak_gib
from tunelab.progress import progress_bar, show_progress

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    output_dir: Path
    final_checkpoint: Path
    metrics_csv: Path
    loss_curve: Path | None
    state: TrainState
    evaluations: dict[int, dict] = field(default_factory=dict)  # step -> task pool metrics
    data_report: dict = field(default_factory=dict)
    tokens_per_s: float = 0.0
    supervised_tokens_per_s: float = 0.0
    train_seconds: float = 0.0
    outputs: dict[str, Path] = field(default_factory=dict)  # e.g. {"merged": ...} from the method
    is_global_zero: bool = True
    loss_unit: str = "token"  # what supervised_tokens_per_s counts: supervised tokens, or pairs
    estimate: dict = field(default_factory=dict)  # the memory/time estimate and what was measured
    exports: list = field(default_factory=list)  # method.export: each export's report
    stopped: bool = False  # SIGTERM stopped the run early; its last checkpoint resumes it


@dataclass
class Run:
    """Everything ``fit`` needs, built by ``train``."""

    fabric: object
    method: Method
    model: torch.nn.Module
    frozen: dict  # name -> frozen model set up by the engine (reference, reward, ...)
    optimizer: torch.optim.Optimizer
    scheduler: object
    loader: DataLoader
    sampler: ResumableSampler
    val_loader: DataLoader | None
    taskpool: object
    tokenizer: object
    output_dir: Path
    config_yaml: str
    metrics: MetricsCSV | None
    log_every_n_steps: int
    show_progress: bool
    flops_per_token: float | None = None  # for train/mfu (Method.flops_per_token)
    peak_tflops: float = 0.0  # what MFU divides by: run option peak_tflops, or this device's measured matmul speed
    source_val_loaders: dict = field(default_factory=dict)  # data.sources: each source's validation split, by name
    stop: "StopRequest" = field(default_factory=lambda: StopRequest(world_size=0))  # never requested unless train() installs one


def _prepare_output_dir(cfg: DictConfig, resuming_from: Path | None) -> Path:
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise TunelabError(f"output_dir '{out}' is a file, not a folder. Choose a folder for the run's checkpoints and logs (it is created if missing).")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise TunelabError(f"output_dir '{out}' cannot be created ({err.strerror}). Choose a folder you can write to.") from None
    if not os.access(out, os.W_OK):
        raise TunelabError(f"output_dir '{out}' is not writable. Choose a folder you can write to, or fix its permissions.")
    marker = out / "run.json"
    if marker.exists() and not cfg.overwrite:
        inside = resuming_from is not None and out.resolve() in resuming_from.resolve().parents
        if not inside:
            started = json.loads(marker.read_text()).get("started", "an earlier time")
            raise TunelabError(
                f"output_dir '{out}' already holds a run (started {started}). Choose another "
                "output_dir, resume it with method.ckpt_path=" + str(out / "checkpoints") +
                ", or pass overwrite=true to replace it."
            )
    elif marker.exists() and cfg.overwrite:
        for name in ("checkpoints", "tensorboard", "metrics.csv", "loss_curve.png", "summary.json"):
            path = out / name
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    return out


def cpu_has_native_bf16() -> bool:
    """bf16 matmuls run natively (AVX512-BF16 or AMX) rather than emulated."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, accelerator: str = "auto") -> str:
    """``auto``: bf16 autocast where the hardware computes in bf16 natively (measured 2x faster
    than fp32 on such CPUs, with the same held-out loss; see bench/), otherwise fp32."""
    if str(precision) != "auto":
        return precision
    if accelerator in ("auto", "cuda", "gpu") and torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "32-true"
    return "bf16-mixed" if cpu_has_native_bf16() else "32-true"


def _launching_rank() -> bool:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0


def _loader(dataset, method: Method, tokenizer, sampler=None, batch_size=None) -> DataLoader:
    kwargs = dict(method.dataloader_kwargs)
    kwargs["batch_size"] = method.examples_per_batch(batch_size or kwargs.get("batch_size", 1))
    kwargs["pin_memory"] = kwargs.get("pin_memory", False) and torch.cuda.is_available()
    return DataLoader(dataset, sampler=sampler, collate_fn=method.collate_fn(tokenizer), **kwargs)


class FrozenModule(torch.nn.Module):
    """A frozen model that runs its forward under the run's autocast, with no gradients."""

    def __init__(self, module: torch.nn.Module, autocast):
        super().__init__()
        self.module, self._autocast = module, autocast
        self.eval()

    def train(self, mode: bool = True):
        return super().train(False)  # frozen: dropout stays off whatever the caller asks

    def forward(self, *args, **kwargs):
        with torch.no_grad(), self._autocast():
            return self.module(*args, **kwargs)


def setup_frozen(fabric, module: torch.nn.Module) -> torch.nn.Module:
    """Put a frozen model where the trained one is: same device and precision, eval mode, no
    gradients. FSDP shards it like the trained model; DDP refuses to wrap a module without
    gradients (and DeepSpeed wraps only the trained one), so elsewhere it is converted to the run's
    precision, moved to the device and run under Fabric's autocast."""
    module.eval().requires_grad_(False)
    if "FSDP" in type(fabric.strategy).__name__:
        return fabric.setup_module(module)
    module = fabric.to_device(fabric.strategy.precision.convert_module(module))
    return FrozenModule(module, fabric.autocast)


def _ordered_batches(fabric, method: Method, tokenizer, batch_size: int):
    """``batches(dataset)``: the dataset's collated batches in order, on the device (for
    ``Method.prepare_data``)."""

    def batches(dataset):
        for batch in _loader(dataset, method, tokenizer, batch_size=batch_size):
            yield fabric.to_device(batch)

    return batches


def _check_data_files(data_cfg: DataConfig) -> None:
    """``data.validate``: errors stop the run with their lines, warnings are logged."""
    findings = check_before_training(data_cfg)
    warnings = [f for f in findings if f.severity == "warning"]
    if warnings and _launching_rank():
        log.warning(describe_warnings(warnings))
    errors = [f for f in findings if f.severity == "error"]
    if errors:
        raise training_refusal(errors, data_cfg)


def check_run(cfg: DictConfig) -> tuple[Method, DataConfig]:
    """Every check a run makes before it loads a model: the config's keys, types and ranges, the
    method's own option checks, and the data files (``data.validate``). ``tunelab train`` and the
    board's launch form call this one function, so both refuse the same input with the same words."""
    validate_config(cfg)
    data_cfg = DataConfig(**OmegaConf.to_container(cfg.data, resolve=True))
    method = instantiate(cfg.method)
    if not isinstance(method, Method):
        raise TunelabError(f"method._target_ builds a {type(method).__name__}, which is not a tunelab.engine.Method.")
    try:
        method.check()
    except UsageError:
        raise
    except TunelabError as err:  # a method's own checks judge option values: a config error (exit 2)
        raise UsageError(str(err)) from None
    _check_data_files(data_cfg)  # before any model or tokenizer loads: a broken line costs a second, not a model load
    return method, data_cfg


def train(cfg: DictConfig) -> RunResult:
    """Run a training job described by a composed config."""
    method, data_cfg = check_run(cfg)
    method.run_dir = Path(cfg.output_dir)  # for files a method writes itself (GRPO's samples)
    resuming_from = resolve_checkpoint(method.ckpt_path) if method.ckpt_path else None
    # Only the launching process (rank 0) judges and cleans the output folder: the other ranks are
    # started by it (or by torchrun) and would find the run it has just begun.
    out = _prepare_output_dir(cfg, resuming_from) if _launching_rank() else Path(cfg.output_dir)

    from tunelab.engine.tracking import build_loggers, finish, log_config

    precision = resolve_precision(cfg.fabric.get("precision", "32-true"), cfg.fabric.get("accelerator", "auto"))
    loggers = build_loggers(cfg, out)
    fabric = instantiate(cfg.fabric, loggers=loggers, precision=precision)
    if "FSDP" in type(fabric.strategy).__name__ and method.save_ckpt_type != "lightning":
        # Sharded weights must be gathered before save_pretrained; that path is not built yet.
        raise TunelabError(
            f"method.save_ckpt_type={method.save_ckpt_type} is not supported with fabric=fsdp yet: use "
            "method.save_ckpt_type=lightning (Fabric's sharded checkpoint), or fabric=ddp for hf/peft folders."
        )
    fabric.launch()
    show_progress(cfg.progress_bar and fabric.is_global_zero)  # also the bars methods show (e.g. DPO's reference pass)
    fabric.seed_everything(cfg.seed, verbose=False)

    pool = instantiate(cfg.modelpool)
    if fabric.device.type == "cpu" and cfg.get("cpu_allocator", "tuned") == "tuned":
        tune_cpu_allocator(QUANTIZED_MMAP_THRESHOLD if getattr(pool, "quantization", None) else DEFAULT_MMAP_THRESHOLD)
    if getattr(pool, "quantization", None) and not getattr(method, "peft_config", None):
        raise TunelabError(
            f"modelpool.quantization={pool.quantization} loads the base in low precision, which trains only through an adapter: "
            "use method=lm_finetune/peftfinetune_sft (QLoRA) or set method.peft_config, or set modelpool.quantization=null."
        )
    tokenizer = pool.load_tokenizer()
    with fabric.rank_zero_first():
        splits = method.build_data(data_cfg, tokenizer)
    taskpool = instantiate(cfg.taskpool)
    if not isinstance(taskpool, TaskPool):
        raise TunelabError(f"taskpool._target_ builds a {type(taskpool).__name__}, which is not a tunelab.evaluation.TaskPool.")
    taskpool.connect(tokenizer, data_cfg)
    if taskpool.needs_validation and splits.val is None:
        raise TunelabError(
            "The task pool evaluates on a validation split but there is none: set data.val_fraction=0.1 "
            "or data.val_path=FILE, or use taskpool=dummy."
        )

    models = method.build_models(pool, tokenizer)
    model = models.trained
    if cfg.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log.info("Parameters: %s trainable of %s (%.1f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    params = models.param_groups if models.param_groups is not None else [p for p in model.parameters() if p.requires_grad]
    optimizer = instantiate(method.optimizer, params=params)
    model, optimizer = fabric.setup(model, optimizer)
    frozen = {name: setup_frozen(fabric, module) for name, module in models.frozen.items()}
    batch_size = int(method.dataloader_kwargs.get("batch_size", 1))
    # Every rank runs prepare_data in step: models set up by DDP or FSDP may communicate in their
    # forward pass, so one rank running them while the others wait would hang.
    fabric.barrier()
    splits, frozen = method.prepare_data(splits, model, frozen, _ordered_batches(fabric, method, tokenizer, batch_size))
    del models  # frozen models that prepare_data let go of are freed here
    train_set, val_set, report = splits

    grouping = {}
    if data_cfg.group_by_length:
        if "input_ids" not in train_set.column_names:
            raise TunelabError("data.group_by_length=true needs token-level examples (input_ids); this method's data has none.")
        grouping = {"lengths": [len(ids) for ids in train_set["input_ids"]], "group_size": 64 * method.examples_per_batch(batch_size) * fabric.world_size}
    mixture = report.mixture  # data.sources: every epoch is the mixture's draw for it
    sampler = ResumableSampler(len(train_set), data_cfg.shuffle, data_cfg.seed, fabric.global_rank, fabric.world_size, mixture=mixture, **grouping)
    loader = _loader(train_set, method, tokenizer, sampler)

    def validation_loader(dataset):
        val_sampler = ResumableSampler(len(dataset), False, 0, fabric.global_rank, fabric.world_size)
        return fabric.setup_dataloaders(_loader(dataset, method, tokenizer, val_sampler, taskpool.batch_size), use_distributed_sampler=False)

    val_loader = validation_loader(val_set) if val_set is not None else None
    # A mixture's validation split is also evaluated source by source (val/loss/<source>, ...).
    source_val_loaders = {
        name: validation_loader(val_set.select(range(offset, offset + size)))
        for name, offset, size in zip(mixture.names, mixture.val_offsets, mixture.val_sizes) if size
    } if mixture is not None and val_set is not None else {}  # fmt: skip
    batches_per_epoch = len(loader)

    scheduler = None
    if method.lr_scheduler:
        scheduler_cfg = replace_placeholder(method.lr_scheduler, "_T_max_", method.scheduler_steps(batches_per_epoch))
        scheduler = instantiate(scheduler_cfg, optimizer=optimizer)
    loader = fabric.setup_dataloaders(loader, use_distributed_sampler=False, move_to_device=True)

    estimate = method.estimate(model, train_set, fabric.device, precision, method.total_steps(batches_per_epoch))
    if estimate is not None and fabric.is_global_zero:
        log.info(estimate.describe(fabric.device.type))
    flops_per_token = method.flops_per_token(model, train_set)
    peak_tflops = cfg.get("peak_tflops")
    if flops_per_token and not peak_tflops:
        peak_tflops = estimate.matmul_tflops if estimate is not None else measure_matmul_tflops(
            fabric.device, torch.bfloat16 if str(precision).startswith("bf16") else torch.float32
        )
    state = TrainState()
    if resuming_from is not None:
        state = load_checkpoint(fabric, str(resuming_from), model=model, optimizer=optimizer, scheduler=scheduler, method=method)
        log.info("Resumed from %s at step %d (epoch %d)", resuming_from, state.global_step, state.epoch)
    # The folder is marked as holding a run only once setup has succeeded, so a typo in a data path
    # does not leave a half-made run behind that the next attempt refuses to overwrite.
    config_yaml = OmegaConf.to_yaml(cfg, resolve=True)
    if fabric.is_global_zero:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.yaml", config_yaml)
        # run.json: when the run began, and what it will take (the board shows progress against it)
        marker = json.loads((out / "run.json").read_text()) if resuming_from is not None and (out / "run.json").exists() else {}
        marker = {"started": marker.get("started", time.strftime("%Y-%m-%d %H:%M:%S")), "total_steps": method.total_steps(batches_per_epoch),
                  "device": fabric.device.type, "estimate": estimate.as_dict() if estimate is not None else None}  # fmt: skip
        atomic_write_text(out / "run.json", json.dumps(marker))
    metrics = MetricsCSV(out / "metrics.csv", resume_step=state.global_step if resuming_from else None) if fabric.is_global_zero else None
    run = Run(
        fabric, method, model, frozen, optimizer, scheduler, loader, sampler, val_loader, taskpool, tokenizer,
        out, config_yaml, metrics, cfg.log_every_n_steps, cfg.progress_bar and fabric.is_global_zero, flops_per_token, peak_tflops or 0.0,
        source_val_loaders,
    )  # fmt: skip
    if fabric.is_global_zero:
        log_config(loggers, OmegaConf.to_container(cfg, resolve=True))
    try:
        with StopRequest(fabric.world_size) as run.stop:
            result = fit(run, state, batches_per_epoch)
    except BaseException:
        finish(loggers, "failed")
        raise
    if mixture is not None:
        lengths = [len(ids) for ids in train_set["input_ids"]] if "input_ids" in train_set.column_names else None
        consumed = state.batches_in_epoch * method.examples_per_batch(batch_size) * fabric.world_size
        mixture.realised = realised_mix(mixture, lengths, data_cfg.seed, data_cfg.shuffle, state.epoch, consumed)
    if estimate is not None:
        result.estimate = _check_estimate(estimate, result, fabric.device)
    result.data_report = report.as_dict()
    result.is_global_zero = fabric.is_global_zero
    result.loss_unit = method.loss_unit
    if fabric.is_global_zero:
        if not result.stopped:  # a stopped run is resumed later, not finalized or exported
            result.outputs = method.finalize(getattr(model, "module", model), out, tokenizer)
        result.loss_curve = plot_loss_curve(out / "metrics.csv", out / "loss_curve.png") if result.metrics_csv.exists() else None
        summary = {
            "final_checkpoint": str(result.final_checkpoint), "global_step": state.global_step,
            "epochs": state.epoch, "train_seconds": result.train_seconds, "tokens_per_s": result.tokens_per_s,
            "supervised_tokens_per_s": result.supervised_tokens_per_s, "loss_unit": method.loss_unit,
            "data": result.data_report, "evaluations": {str(k): v for k, v in result.evaluations.items()},
            "trainable_parameters": trainable, "total_parameters": total,
            "outputs": {k: str(v) for k, v in result.outputs.items()}, "estimate": result.estimate,
            "heldout_by_source": heldout_by_source(result.evaluations, mixture), **({"stopped": True} if result.stopped else {}),
        }  # fmt: skip
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
        if method.export and not result.stopped:  # after the summary: an export reads the run's final checkpoint through it
            from tunelab.deploy.export import export_after_training

            summary["exports"] = result.exports = export_after_training(result.final_checkpoint, out / "export", list(method.export))
            atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    finish(loggers, "KILLED" if result.stopped else "success")  # MLflow's status for a run stopped by hand
    return result


def heldout_by_source(evaluations: dict[int, dict], mixture) -> dict:
    """The forgetting report of a mixture: each source's held-out loss at the first and the last
    evaluation (with taskpool.at_start, before training), by name, with its role; a general
    source (role eval or replay) whose loss rose shows what the run forgot."""
    if mixture is None or not evaluations:
        return {}
    first, last = min(evaluations), max(evaluations)
    report = {}
    for name, role in zip(mixture.names, mixture.roles):
        key = f"val/loss/{name}"
        if key in evaluations[first] and key in evaluations[last]:
            before, after = evaluations[first][key], evaluations[last][key]
            report[name] = {"role": role, "step_before": first, "loss_before": before, "step_after": last, "loss_after": after, "change": after - before}
            log.info("Held-out loss of %s (%s): %.4f at step %d -> %.4f at step %d (%+.4f)", name, role, before, first, after, last, after - before)
    return report


def _check_estimate(estimate, result: "RunResult", device) -> dict:
    """The estimate next to what the run measured, logged and kept for summary.json."""
    measured_peak = measured_peak_gib(device)
    steps = max(result.state.global_step, 1)
    measured_step = result.train_seconds / steps if result.train_seconds else float("nan")
    log.info(
        "Measured: peak %.1f GiB (estimated %.1f), %.1f s per step (estimated %.1f)",
        measured_peak, estimate.peak_gib, measured_step, estimate.seconds_per_step,
    )
    return {**estimate.as_dict(), "measured_peak_gib": measured_peak, "measured_seconds_per_step": measured_step}


def _grad_norm(parameters) -> torch.Tensor:
    norms = [p.grad.detach().float().norm() for p in parameters if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.tensor(0.0)


def _clip_gradients(fabric, model, optimizer, method) -> torch.Tensor:
    """Clip the gradients as configured; return their total norm before clipping (on the device)."""
    if method.gradient_clip_val is not None and method.gradient_clip_algorithm == "norm":
        return fabric.clip_gradients(model, optimizer, max_norm=method.gradient_clip_val)
    norm = _grad_norm(p for p in model.parameters() if p.requires_grad)
    if method.gradient_clip_val is not None:
        fabric.clip_gradients(model, optimizer, clip_val=method.gradient_clip_val)
    return norm


def _on_device(values, device) -> torch.Tensor:
    """Numbers and 0-d tensors -> one float64 vector on the device, without waiting for it: numbers
    and host tensors are written by a fill on the device, never copied from pageable host memory
    (that copy would wait for everything queued before it)."""

    def one(v):
        if isinstance(v, torch.Tensor) and v.device.type != "cpu":
            return v.detach().to(device=device, dtype=torch.float64)
        return torch.full((), float(v), dtype=torch.float64, device=device)

    return torch.stack([one(v) for v in values])


@dataclass
class StepNumbers:
    """One step's numbers (metric sums, units, gradient norms, token counts), gathered on the device
    while the step is queued. ``send`` starts copying them to the host behind the step's work; ``read``
    waits for that copy alone. The engine reads a step at once when it keeps something (a
    checkpoint, an evaluation, an epoch's end, the last step), and a step that is only logged after
    the next step's work is queued, so the device does not idle while the host logs and loads."""

    step: int
    epoch: int
    keys: list[list[str]] = field(default_factory=list)  # per optimizer update: the metric names of ...
    sums: list[torch.Tensor] = field(default_factory=list)  # ... its metric sums over every unit and rank
    units: list[torch.Tensor] = field(default_factory=list)  # per update: its units over every rank
    grad_norms: list = field(default_factory=list)
    lr: float = 0.0
    logged: bool = False
    clock: float = 0.0  # the engine's training clock when the step's work was queued
    values: torch.Tensor | None = None  # everything above, one vector, on its way to the host
    done: object = None  # CUDA: an event recorded after the step's work

    def send(self, counts: torch.Tensor, interval: torch.Tensor, device: torch.device) -> None:
        """``counts``: the step's tokens and units; ``interval``: those since the previous read."""
        values = torch.cat([*self.sums, *self.units, _on_device(self.grad_norms, device), counts, interval])
        if values.device.type == "cuda":
            self.values = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            self.values.copy_(values, non_blocking=True)
            self.done = torch.cuda.Event(enable_timing=True)
            self.done.record()
        else:
            self.values = values

    def read(self) -> tuple[list[dict], list[float], list[float], list[float]]:
        """Wait for the copy; per update its metric sums and its units, the gradient norms, and
        (tokens, units, interval tokens, interval units)."""
        if self.done is not None:
            self.done.synchronize()
        values, at, sums = self.values.tolist(), 0, []
        for keys in self.keys:
            sums.append(dict(zip(keys, values[at : at + len(keys)])))
            at += len(keys)
        units = values[at : at + len(sums)]
        norms = values[at + len(sums) : at + len(sums) + len(self.grad_norms)]
        return sums, units, norms, values[-4:]


class StopRequest:
    """SIGTERM asks a one-process run to stop after the step it is in: the loop writes a checkpoint
    and returns, so ``method.ckpt_path=OUTPUT_DIR/checkpoints`` resumes it where it stopped (the
    board's Stop button sends it). With several processes SIGTERM keeps its default action: the
    ranks could not agree on the step to stop at without a collective every step."""

    def __init__(self, world_size: int):
        self.requested = False
        self._previous = None
        self._installed = world_size == 1 and threading.current_thread() is threading.main_thread()

    def __enter__(self) -> "StopRequest":
        if self._installed:
            self._previous = signal.signal(signal.SIGTERM, self._request)
        return self

    def _request(self, signum, frame) -> None:
        self.requested = True
        log.warning("Stop requested (SIGTERM): finishing this step, then writing a checkpoint.")

    def __exit__(self, *exc) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)


def fit(run: Run, state: TrainState, batches_per_epoch: int) -> RunResult:
    """The training loop. Reads top to bottom: one optimizer step per iteration.

    Losses, unit counts and metrics stay on the device while the step runs; the loop waits for the
    device once per step whose numbers it reads (``StepNumbers``: logged steps, and steps after
    which something is kept), never per micro-batch, and a step that is only logged is read after
    the next one is queued.
    """
    fabric, method, model, optimizer = run.fabric, run.method, run.model, run.optimizer
    total_steps = method.total_steps(batches_per_epoch)
    steps_per_epoch = method.steps_per_epoch(batches_per_epoch)
    batch_size = method.examples_per_batch(int(method.dataloader_kwargs.get("batch_size", 1)))
    result = RunResult(run.output_dir, Path(), run.output_dir / "metrics.csv", None, state)
    checkpoints = run.output_dir / "checkpoints"
    last_saved_step = -1

    def checkpoint() -> Path:
        nonlocal last_saved_step
        folder = save_checkpoint(
            fabric, checkpoints / f"step-{state.global_step:06d}", model=model, optimizer=optimizer,
            scheduler=run.scheduler, state=state, options=method, method_state=method.state_dict(), tokenizer=run.tokenizer, config_yaml=run.config_yaml,
        )  # fmt: skip
        last_saved_step = state.global_step
        return folder

    def evaluate() -> None:
        scores = run.taskpool.evaluate(fabric, model, method, run.val_loader)
        for name, loader in run.source_val_loaders.items():
            scores |= {f"{key}/{name}": value for key, value in run.taskpool.evaluate(fabric, model, method, loader).items()}
        if scores:
            result.evaluations[state.global_step] = scores
            fabric.log_dict(scores, step=state.global_step)
            if run.metrics is not None:
                run.metrics.log(scores, state.global_step)
            log.info("step %d: %s", state.global_step, ", ".join(f"{k}={v:.4f}" for k, v in scores.items()))

    def keeps_something(step: int, step_in_epoch: int) -> bool:
        """Steps after which something is kept or evaluated: their numbers are read at once."""
        every = run.taskpool.every_n_steps
        return (
            step == total_steps or step_in_epoch == steps_per_epoch
            or (method.checkpoint_save_interval == "step" and step % method.checkpoint_save_frequency == 0)
            or bool(every and step % every == 0)
        )  # fmt: skip

    bar = progress_bar(total_steps, initial=state.global_step, enabled=run.show_progress, desc="Training")
    seen = torch.zeros(2, dtype=torch.float64, device=fabric.device)  # tokens, units over the whole run
    since_read = torch.zeros_like(seen)  # ... and since the numbers were last read
    train_seconds = 0.0  # time spent in steps (evaluations and checkpoints excluded)
    # Where the interval since the last read began: a step, its training clock and (CUDA) its event;
    # after an evaluation or a checkpoint the next step's start. Tokens read so far, for the bar.
    since = {"step": state.global_step, "clock": 0.0, "event": None, "tokens": 0.0}
    unread: StepNumbers | None = None  # a logged step not read yet

    def read(numbers: StepNumbers) -> None:
        """Wait for a step's numbers; the NaN guard; its log line."""
        sums, units, norms, (tokens, n_units, interval_tokens, interval_units) = numbers.read()
        for index, (update, update_units) in enumerate(zip(sums, units)):
            loss = update["loss"] / max(update_units, 1)
            if not math.isfinite(loss):
                where = f"the last good checkpoint is {checkpoints / (checkpoints / 'latest').read_text().strip()}" if (checkpoints / "latest").exists() else "no checkpoint had been written yet"
                unchecked = "" if since["step"] == numbers.step - 1 else (
                    f" (the loss is read every log_every_n_steps={run.log_every_n_steps} steps: it may have "
                    f"turned after step {since['step']})")
                which = f" (update {index + 1} of {len(sums)})" if len(sums) > 1 else ""
                raise TunelabError(
                    f"The training loss became {loss} at step {numbers.step}{which} (epoch {numbers.epoch}){unchecked}; the run "
                    f"stopped, no checkpoint holds weights trained on it, and {where}. Lower method.optimizer.lr, set "
                    "method.gradient_clip_val=1.0, or check the data for broken examples."
                )
        totals: dict[str, float] = {}
        for update in sums:
            totals = {key: totals.get(key, 0.0) + value for key, value in update.items()}
        means = {key: value / max(n_units, 1) for key, value in totals.items()}
        # On CUDA the device's own clock between the step ends (the host queues ahead of it);
        # elsewhere the host's, which waited for each step.
        if numbers.done is not None and since["event"] is not None:
            seconds = since["event"].elapsed_time(numbers.done) / 1000
        else:
            seconds = numbers.clock - since["clock"]
        seconds = max(seconds, 1e-9)
        if numbers.logged:
            row = {
                **{f"train/{key}": value for key, value in means.items()}, "train/lr": numbers.lr,
                "train/grad_norm": sum(norms) / len(norms), "train/tokens_per_s": interval_tokens / seconds,
                "train/supervised_tokens_per_s": interval_units / seconds, "train/tokens": tokens, "train/supervised_tokens": n_units,
                "train/step_seconds": seconds / (numbers.step - since["step"]), "train/epoch": numbers.epoch,
            }  # fmt: skip
            if run.flops_per_token and run.peak_tflops:  # per device: each rank's tokens against its own peak
                row["train/mfu"] = interval_tokens / fabric.world_size / seconds * run.flops_per_token / (run.peak_tflops * 1e12)
            fabric.log_dict(row, step=numbers.step)
            if run.metrics is not None:
                run.metrics.log(row, numbers.step)
        since.update(step=numbers.step, clock=numbers.clock, event=numbers.done, tokens=since["tokens"] + interval_tokens)
        bar.set_postfix(loss=f"{means['loss']:.4f}", tok_s=f"{since['tokens'] / max(numbers.clock, 1e-9):.0f}")

    def read_unread() -> None:
        nonlocal unread
        if unread is not None:
            numbers, unread = unread, None
            read(numbers)

    def restart_interval() -> None:
        """After work that is not training (an evaluation, a checkpoint): the next interval starts
        with the next step."""
        read_unread()
        since.update(step=state.global_step, clock=train_seconds, event=None)

    if run.taskpool.at_start and state.global_step == 0:
        evaluate()
    model.train()
    while state.global_step < total_steps:
        step_in_epoch = math.ceil(state.batches_in_epoch / method.accumulate_grad_batches)
        run.sampler.set_position(state.epoch, start=state.batches_in_epoch * batch_size)
        batches = iter(run.loader)
        exhausted = False
        while state.global_step < total_steps and step_in_epoch < steps_per_epoch:
            started = time.perf_counter()
            if since["event"] is None and fabric.device.type == "cuda" and since["step"] == state.global_step:
                since["event"] = torch.cuda.Event(enable_timing=True)
                since["event"].record()
            micro_batches = list(islice(batches, method.accumulate_grad_batches))
            if not micro_batches:
                exhausted = True
                break
            n_micro = len(micro_batches)
            if method.generates_before_step:  # never generate from weights a non-finite loss broke
                read_unread()
            micro_batches = method.before_step(model, run.frozen, micro_batches, state.global_step)
            step = state.global_step + 1
            logged = step % run.log_every_n_steps == 0 or step == total_steps
            keeps = keeps_something(step, step_in_epoch + 1)
            numbers = StepNumbers(step, state.epoch, logged=logged) if logged or keeps else None
            step_counts = torch.zeros_like(seen)
            # One optimizer step per update; a method that reuses what it generated (PPO) makes several.
            for update_index, update in enumerate(method.updates(micro_batches, state.global_step)):
                # Weight every unit equally across micro-batches and ranks, so k accumulated
                # micro-batches give the gradient of one batch holding them all.
                counts = _on_device([sum(real_tokens(b) for b in update), sum(method.loss_units(b) for b in update)], fabric.device)
                counts = fabric.all_reduce(counts, reduce_op="sum")
                units = counts[1].clamp(min=1)
                sums: dict[str, torch.Tensor] = {}
                for i, batch in enumerate(update):
                    with fabric.no_backward_sync(model, enabled=i < len(update) - 1):
                        out = LossResult(*method.loss(model, batch))
                        # DDP averages gradients over ranks; scale back to a sum over all units.
                        fabric.backward(out.loss * fabric.world_size / units)
                    for key, value in {"loss": out.loss, **out.metrics}.items():
                        value = value.detach() if isinstance(value, torch.Tensor) else value
                        sums[key] = sums[key] + value if key in sums else value
                grad_norm = _clip_gradients(fabric, model, optimizer, method)
                if numbers is not None:  # one collective for the update's metrics
                    numbers.keys.append(list(sums))
                    numbers.sums.append(fabric.all_reduce(_on_device(sums.values(), fabric.device), reduce_op="sum"))
                    numbers.units.append(counts[1:])
                    numbers.grad_norms.append(grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step_counts += counts
                updates_done = state.global_step * method.updates_per_step() + update_index + 1
                if run.scheduler is not None and method.lr_scheduler_interval == "step" and updates_done % method.lr_scheduler_frequency == 0:
                    run.scheduler.step()
            seen += step_counts
            since_read += step_counts
            state.global_step += 1
            state.batches_in_epoch += n_micro
            step_in_epoch += 1
            if numbers is not None:
                numbers.lr, numbers.clock = optimizer.param_groups[0]["lr"], train_seconds + time.perf_counter() - started
                numbers.send(step_counts, since_read, fabric.device)
                since_read = torch.zeros_like(seen)
            read_unread()  # the previous step's numbers: this step's work is queued behind them
            unread = numbers
            if keeps:
                read_unread()
            train_seconds += time.perf_counter() - started
            bar.update(1)
            if run.taskpool.every_n_steps and state.global_step % run.taskpool.every_n_steps == 0 and state.global_step < total_steps:
                evaluate()
                restart_interval()
            if method.checkpoint_save_interval == "step" and state.global_step % method.checkpoint_save_frequency == 0:
                result.final_checkpoint = checkpoint()
                restart_interval()
            if run.stop.requested:
                break
        read_unread()  # an epoch that ran out of batches early
        if run.stop.requested and state.global_step < total_steps:
            result.stopped = True
            break
        if exhausted or step_in_epoch >= steps_per_epoch:
            state.epoch, state.batches_in_epoch = state.epoch + 1, 0
            if run.scheduler is not None and method.lr_scheduler_interval == "epoch" and state.epoch % method.lr_scheduler_frequency == 0:
                run.scheduler.step()
            if method.checkpoint_save_interval == "epoch" and state.epoch % method.checkpoint_save_frequency == 0:
                result.final_checkpoint = checkpoint()
            restart_interval()
    bar.close()
    if not result.stopped:
        evaluate()
    if last_saved_step != state.global_step:
        result.final_checkpoint = checkpoint()
    tokens_seen, units_seen = seen.tolist()
    result.train_seconds = train_seconds
    result.tokens_per_s = tokens_seen / train_seconds if train_seconds else 0.0
    result.supervised_tokens_per_s = units_seen / train_seconds if train_seconds else 0.0
    return result
