"""The engine: one Lightning Fabric loop that runs every method the same way.

``train(cfg)`` builds the parts of a run (fabric, model pool, method, data, task pool) and calls
``fit``, the loop itself: step, accumulate, clip, schedule, log, evaluate, checkpoint.
"""

import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from tunelab.config import DataConfig, instantiate, replace_placeholder, validate_config
from tunelab.data import ResumableSampler, batch_tokens
from tunelab.engine.allocator import tune_cpu_allocator
from tunelab.engine.checkpoint import TrainState, atomic_write_text, load_checkpoint, resolve_checkpoint, save_checkpoint
from tunelab.engine.metrics import MetricsCSV, plot_loss_curve
from tunelab.errors import TunelabError
from tunelab.planning import estimate_run, measured_peak_gib
from tunelab.progress import progress_bar

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


@dataclass
class Run:
    """Everything ``fit`` needs, built by ``train``."""

    fabric: object
    method: object
    model: torch.nn.Module
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


def _prepare_output_dir(cfg: DictConfig, resuming_from: Path | None) -> Path:
    out = Path(cfg.output_dir)
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


def _loader(dataset, method, tokenizer, sampler=None, batch_size=None) -> DataLoader:
    kwargs = dict(method.dataloader_kwargs)
    kwargs["batch_size"] = method.examples_per_batch(batch_size or kwargs.get("batch_size", 1))
    kwargs["pin_memory"] = kwargs.get("pin_memory", False) and torch.cuda.is_available()
    return DataLoader(dataset, sampler=sampler, collate_fn=method.collate_fn(tokenizer), **kwargs)


def train(cfg: DictConfig) -> RunResult:
    """Run a training job described by a composed config."""
    validate_config(cfg)
    data_cfg = DataConfig(**OmegaConf.to_container(cfg.data, resolve=True))
    method = instantiate(cfg.method)
    method.check()
    resuming_from = resolve_checkpoint(method.ckpt_path) if method.ckpt_path else None
    # Only the launching process (rank 0) judges and cleans the output folder: the other ranks are
    # started by it (or by torchrun) and would find the run it has just begun.
    out = _prepare_output_dir(cfg, resuming_from) if _launching_rank() else Path(cfg.output_dir)

    from lightning.fabric.loggers import TensorBoardLogger

    precision = resolve_precision(cfg.fabric.get("precision", "32-true"), cfg.fabric.get("accelerator", "auto"))
    loggers = [TensorBoardLogger(root_dir=str(out), name="tensorboard", version="")]
    fabric = instantiate(cfg.fabric, loggers=loggers, precision=precision)
    if "FSDP" in type(fabric.strategy).__name__ and method.save_ckpt_type != "lightning":
        # Sharded weights must be gathered before save_pretrained; that path is not built yet.
        raise TunelabError(
            f"method.save_ckpt_type={method.save_ckpt_type} is not supported with fabric=fsdp yet: use "
            "method.save_ckpt_type=lightning (Fabric's sharded checkpoint), or fabric=ddp for hf/peft folders."
        )
    fabric.launch()
    if fabric.device.type == "cpu" and cfg.get("cpu_allocator", "tuned") == "tuned":
        tune_cpu_allocator()
    fabric.seed_everything(cfg.seed, verbose=False)

    pool = instantiate(cfg.modelpool)
    tokenizer = pool.load_tokenizer()
    with fabric.rank_zero_first():
        train_set, val_set, report = method.build_data(data_cfg, tokenizer)
    taskpool = instantiate(cfg.taskpool)
    if getattr(taskpool, "needs_validation", False) and val_set is None:
        raise TunelabError(
            "The task pool evaluates on a validation split but there is none: set data.val_fraction=0.1 "
            "or data.val_path=FILE, or use taskpool=dummy."
        )

    model = method.prepare_model(pool.load_model(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id))
    if cfg.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log.info("Parameters: %s trainable of %s (%.1f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)

    grouping = {}
    if data_cfg.group_by_length:
        if "input_ids" not in train_set.column_names:
            raise TunelabError("data.group_by_length=true needs token-level examples (input_ids); this method's data has none.")
        batch = method.examples_per_batch(int(method.dataloader_kwargs.get("batch_size", 1)))
        grouping = {"lengths": [len(ids) for ids in train_set["input_ids"]], "group_size": 64 * batch * fabric.world_size}
    sampler = ResumableSampler(len(train_set), data_cfg.shuffle, data_cfg.seed, fabric.global_rank, fabric.world_size, **grouping)
    loader = _loader(train_set, method, tokenizer, sampler)
    val_loader = None
    if val_set is not None:
        val_sampler = ResumableSampler(len(val_set), False, 0, fabric.global_rank, fabric.world_size)
        val_loader = _loader(val_set, method, tokenizer, val_sampler, getattr(taskpool, "batch_size", None))
    batches_per_epoch = len(loader)

    optimizer = instantiate(method.optimizer, params=[p for p in model.parameters() if p.requires_grad])
    model, optimizer = fabric.setup(model, optimizer)
    scheduler = None
    if method.lr_scheduler:
        scheduler_cfg = replace_placeholder(method.lr_scheduler, "_T_max_", method.scheduler_steps(batches_per_epoch))
        scheduler = instantiate(scheduler_cfg, optimizer=optimizer)
    loader = fabric.setup_dataloaders(loader, use_distributed_sampler=False, move_to_device=True)
    if val_loader is not None:
        val_loader = fabric.setup_dataloaders(val_loader, use_distributed_sampler=False)

    estimate = _estimate(model, method, train_set, fabric, precision, batches_per_epoch)
    state = TrainState()
    if resuming_from is not None:
        state = load_checkpoint(fabric, str(resuming_from), model=model, optimizer=optimizer, scheduler=scheduler)
        log.info("Resumed from %s at step %d (epoch %d)", resuming_from, state.global_step, state.epoch)
    # The folder is marked as holding a run only once setup has succeeded, so a typo in a data path
    # does not leave a half-made run behind that the next attempt refuses to overwrite.
    config_yaml = OmegaConf.to_yaml(cfg, resolve=True)
    if fabric.is_global_zero:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.yaml", config_yaml)
        if resuming_from is None or not (out / "run.json").exists():
            atomic_write_text(out / "run.json", json.dumps({"started": time.strftime("%Y-%m-%d %H:%M:%S")}))
    metrics = MetricsCSV(out / "metrics.csv", resume_step=state.global_step if resuming_from else None) if fabric.is_global_zero else None
    run = Run(
        fabric, method, model, optimizer, scheduler, loader, sampler, val_loader, taskpool, tokenizer,
        out, config_yaml, metrics, cfg.log_every_n_steps, cfg.progress_bar and fabric.is_global_zero,
    )  # fmt: skip
    result = fit(run, state, batches_per_epoch)
    if estimate is not None:
        result.estimate = _check_estimate(estimate, result, fabric.device)
    result.data_report = report.as_dict()
    result.is_global_zero = fabric.is_global_zero
    result.loss_unit = getattr(method, "loss_unit", "token")
    if fabric.is_global_zero:
        result.outputs = method.finalize(getattr(model, "module", model), out, tokenizer)
        result.loss_curve = plot_loss_curve(out / "metrics.csv", out / "loss_curve.png") if result.metrics_csv.exists() else None
        summary = {
            "final_checkpoint": str(result.final_checkpoint), "global_step": state.global_step,
            "epochs": state.epoch, "train_seconds": result.train_seconds, "tokens_per_s": result.tokens_per_s,
            "supervised_tokens_per_s": result.supervised_tokens_per_s, "data": result.data_report,
            "evaluations": {str(k): v for k, v in result.evaluations.items()},
            "trainable_parameters": trainable, "total_parameters": total,
            "outputs": {k: str(v) for k, v in result.outputs.items()}, "estimate": result.estimate,
        }  # fmt: skip
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    return result


def _estimate(model, method, train_set, fabric, precision: str, batches_per_epoch: int):
    """Log a memory/time estimate before the first step (token-level SFT methods)."""
    if "labels" not in getattr(train_set, "column_names", []) or not hasattr(method, "packing") or not len(train_set):
        return None
    sample = train_set.shuffle(seed=0).select(range(min(len(train_set), 2000))) if len(train_set) > 2000 else train_set
    lengths = [len(ids) for ids in sample["input_ids"]]
    supervised = [sum(1 for t in labels[1:] if t != -100) for labels in sample["labels"]]
    estimate = estimate_run(
        model, precision=precision, lengths=lengths, supervised=supervised, steps=method.total_steps(batches_per_epoch),
        batch_size=int(method.dataloader_kwargs.get("batch_size", 1)), packing=method.packing,
        accumulate=method.accumulate_grad_batches, chunked_loss=method.chunked_loss,
        loss_chunk_size=method.loss_chunk_size, device=fabric.device,
        fused_kernels=getattr(method, "fused_kernels", False),
    )  # fmt: skip
    if fabric.is_global_zero:
        log.info(estimate.describe(fabric.device.type))
    return estimate


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


def _clip_gradients(fabric, model, optimizer, method) -> float:
    """Clip the gradients as configured; return their total norm before clipping."""
    if method.gradient_clip_val is not None and method.gradient_clip_algorithm == "norm":
        return float(fabric.clip_gradients(model, optimizer, max_norm=method.gradient_clip_val))
    norm = _grad_norm(p for p in model.parameters() if p.requires_grad).item()
    if method.gradient_clip_val is not None:
        fabric.clip_gradients(model, optimizer, clip_val=method.gradient_clip_val)
    return norm


def fit(run: Run, state: TrainState, batches_per_epoch: int) -> RunResult:
    """The training loop. Reads top to bottom: one optimizer step per iteration."""
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
            scheduler=run.scheduler, state=state, options=method, tokenizer=run.tokenizer, config_yaml=run.config_yaml,
        )  # fmt: skip
        last_saved_step = state.global_step
        return folder

    def evaluate() -> None:
        scores = run.taskpool.evaluate(fabric, model, method, run.val_loader)
        if scores:
            result.evaluations[state.global_step] = scores
            fabric.log_dict(scores, step=state.global_step)
            if run.metrics is not None:
                run.metrics.log(scores, state.global_step)
            log.info("step %d: %s", state.global_step, ", ".join(f"{k}={v:.4f}" for k, v in scores.items()))

    if run.taskpool.at_start and state.global_step == 0:
        evaluate()
    bar = progress_bar(total_steps, initial=state.global_step, enabled=run.show_progress, desc="Training")
    tokens_seen = supervised_seen = 0
    train_seconds = 0.0
    model.train()
    while state.global_step < total_steps:
        step_in_epoch = math.ceil(state.batches_in_epoch / method.accumulate_grad_batches)
        run.sampler.set_position(state.epoch, start=state.batches_in_epoch * batch_size)
        batches = iter(run.loader)
        exhausted = False
        while state.global_step < total_steps and step_in_epoch < steps_per_epoch:
            started = time.perf_counter()
            micro_batches = list(islice(batches, method.accumulate_grad_batches))
            if not micro_batches:
                exhausted = True
                break
            # Weight every supervised token equally across micro-batches and ranks, so k
            # accumulated micro-batches give the gradient of one batch holding them all.
            units = fabric.all_reduce(
                torch.tensor(float(sum(method.loss_units(b) for b in micro_batches)), device=fabric.device), reduce_op="sum"
            ).item()
            sums: dict[str, float] = {"loss": 0.0}
            for i, batch in enumerate(micro_batches):
                with fabric.no_backward_sync(model, enabled=i < len(micro_batches) - 1):
                    loss_sum, _, extra = method.loss(model, batch)
                    # DDP averages gradients over ranks; scale back to a sum over all units.
                    fabric.backward(loss_sum * fabric.world_size / max(units, 1))
                for key, value in {"loss": loss_sum.detach(), **extra}.items():
                    sums[key] = sums.get(key, 0.0) + float(value)
            # One collective for the metrics and the non-pad token count of this step.
            sums["tokens"] = float(sum(batch_tokens(b) for b in micro_batches))
            totals = dict(zip(sums, fabric.all_reduce(torch.tensor(list(sums.values()), dtype=torch.float64, device=fabric.device), reduce_op="sum").tolist()))
            tokens = totals.pop("tokens")
            means = {key: value / max(units, 1) for key, value in totals.items()}
            loss = means["loss"]
            if not math.isfinite(loss):
                where = f"the last good checkpoint is {checkpoints / (checkpoints / 'latest').read_text().strip()}" if (checkpoints / "latest").exists() else "no checkpoint had been written yet"
                raise TunelabError(
                    f"The training loss became {loss} at step {state.global_step + 1} (epoch {state.epoch}); the run "
                    f"stopped before applying that update, and {where}. Lower method.optimizer.lr, set "
                    "method.gradient_clip_val=1.0, or check the data for broken examples."
                )
            grad_norm = _clip_gradients(fabric, model, optimizer, method)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state.global_step += 1
            state.batches_in_epoch += len(micro_batches)
            step_in_epoch += 1
            if run.scheduler is not None and method.lr_scheduler_interval == "step" and state.global_step % method.lr_scheduler_frequency == 0:
                run.scheduler.step()

            elapsed = time.perf_counter() - started
            tokens_seen, supervised_seen, train_seconds = tokens_seen + tokens, supervised_seen + units, train_seconds + elapsed
            if state.global_step % run.log_every_n_steps == 0 or state.global_step == total_steps:
                values = {
                    **{f"train/{key}": value for key, value in means.items()}, "train/lr": optimizer.param_groups[0]["lr"], "train/grad_norm": grad_norm,
                    "train/tokens_per_s": tokens / elapsed, "train/supervised_tokens_per_s": units / elapsed,
                    "train/tokens": tokens, "train/supervised_tokens": units, "train/step_seconds": elapsed,
                    "train/epoch": state.epoch,
                }  # fmt: skip
                fabric.log_dict(values, step=state.global_step)
                if run.metrics is not None:
                    run.metrics.log(values, state.global_step)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_seen / train_seconds:.0f}")
            if run.taskpool.every_n_steps and state.global_step % run.taskpool.every_n_steps == 0 and state.global_step < total_steps:
                evaluate()
            if method.checkpoint_save_interval == "step" and state.global_step % method.checkpoint_save_frequency == 0:
                result.final_checkpoint = checkpoint()
        if exhausted or step_in_epoch >= steps_per_epoch:
            state.epoch, state.batches_in_epoch = state.epoch + 1, 0
            if run.scheduler is not None and method.lr_scheduler_interval == "epoch" and state.epoch % method.lr_scheduler_frequency == 0:
                run.scheduler.step()
            if method.checkpoint_save_interval == "epoch" and state.epoch % method.checkpoint_save_frequency == 0:
                result.final_checkpoint = checkpoint()
    bar.close()
    evaluate()
    if last_saved_step != state.global_step:
        result.final_checkpoint = checkpoint()
    result.train_seconds = train_seconds
    result.tokens_per_s = tokens_seen / train_seconds if train_seconds else 0.0
    result.supervised_tokens_per_s = supervised_seen / train_seconds if train_seconds else 0.0
    return result
