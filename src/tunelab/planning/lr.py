"""``tunelab plan lr``: a learning rate for a run, from a rule with its sources, and optionally from
a short LR range test on the user's own model and data.

The rule: the rate published for a 7B model with that method at a reference batch, scaled by
``sqrt(7e9 / parameters)`` (smaller models take larger steps, capped at 20x) and by
``sqrt(batch / reference batch)`` (Adam's square-root scaling). tunelab's LoRA sweep on
SmolLM2-135M (``bench/RESULTS-peft.md``: held-out loss 1.059 at 2e-4, 0.946 at 5e-4, 0.898 at 1e-3,
0.880 at 2e-3, batch 8) is the measured point the tests hold the rule to.

The probe (``--probe``, Smith's LR range test, 2017): a short run whose rate grows exponentially
from ``1e-7`` to ``1`` over ``--probe-steps`` steps; the loss, smoothed, falls, bottoms out and
diverges; the suggestion is the rate at the bottom divided by 10, not above where the loss fell
fastest times 3.
"""

import math
from dataclasses import dataclass, field

from tunelab.errors import UsageError

# method -> (rate for a 7B model, reference batch, source)
PUBLISHED = {
    "full": (2e-5, 128, "Alpaca and Vicuna's 7B fine-tunes: 2e-5 at batch 128"),
    "lora": (2e-4, 16, "QLoRA (Dettmers et al., 2023): 2e-4 for 7B and 13B at batch 16"),
    "qlora": (2e-4, 16, "QLoRA (Dettmers et al., 2023): 2e-4 for 7B and 13B at batch 16"),
    "dpo": (5e-7, 64, "Zephyr-7B's DPO: 5e-7 at batch 64 (the DPO paper: 1e-6)"),
    "dpo-lora": (5e-6, 64, "DPO through LoRA: about 10x the full rate, as for SFT"),
}
# What tunelab measured: (method, parameters, batch, rates whose held-out loss was within 3% of the best)
MEASURED = [("lora", 134_515_008, 8, (1e-3, 2e-3))]


@dataclass
class LRAdvice:
    method: str
    parameters: int
    batch_size: int
    rate: float
    reasons: list[str] = field(default_factory=list)
    probe: dict | None = None  # the range test: rates, losses, suggestion

    def render(self) -> str:
        lines = [f"Learning rate for {self.method} on {self.parameters / 1e6:,.0f}M parameters at batch {self.batch_size}: {self.rate:.1e}"]
        lines += [f"  {why}" for why in self.reasons]
        if self.probe:
            p = self.probe
            lines.append(f"Range test ({len(p['rates'])} steps): the smoothed loss bottomed at {p['bottom']:.1e} and fell fastest at "
                         f"{p['steepest']:.1e}; suggested {p['suggested']:.1e}" + (f" ({p['note']})" if p.get("note") else ""))  # fmt: skip
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {"method": self.method, "parameters": self.parameters, "batch_size": self.batch_size, "rate": self.rate, "reasons": self.reasons,
                "probe": self.probe}  # fmt: skip


def rule_rate(method: str, parameters: int, batch_size: int) -> LRAdvice:
    if method not in PUBLISHED:
        raise UsageError(f"--method {method!r}: choose {', '.join(PUBLISHED)}.")
    if parameters <= 0 or batch_size <= 0:
        raise UsageError("the model's parameters and the batch must be positive.")
    published, reference, source = PUBLISHED[method]
    size = min(math.sqrt(7e9 / parameters), 20.0)
    batch = math.sqrt(batch_size / reference)
    rate = published * size * batch
    reasons = [f"published: {published:.0e} for a 7B model at batch {reference} ({source})",
               f"model size: x{size:.2f} (sqrt(7B / {parameters / 1e6:,.0f}M), at most x20)",
               f"batch: x{batch:.2f} (sqrt({batch_size} / {reference}), Adam's square-root scaling)"]  # fmt: skip
    return LRAdvice(method, parameters, batch_size, rate, reasons)


def pick_from_range_test(rates: list[float], losses: list[float], smoothing: float = 0.7) -> dict:
    """The suggestion of an LR range test: the loss smoothed (exponential average, bias-corrected),
    its bottom, the rate where it fell fastest (per log-rate), and bottom / 10, not above 3x the
    steepest."""
    if len(rates) < 5 or len(rates) != len(losses):
        raise UsageError(f"the range test needs at least 5 steps with a loss each (got {len(losses)}).")
    smoothed, average = [], 0.0
    for k, loss in enumerate(losses, 1):
        average = smoothing * average + (1 - smoothing) * loss
        smoothed.append(average / (1 - smoothing**k))
    finite = [i for i, v in enumerate(smoothed) if math.isfinite(v)]
    bottom = min(finite, key=lambda i: smoothed[i])
    slopes = [(smoothed[i + 1] - smoothed[i]) / (math.log(rates[i + 1]) - math.log(rates[i])) for i in range(min(bottom, len(rates) - 1))]
    steepest = min(range(len(slopes)), key=lambda i: slopes[i]) if slopes else bottom
    suggested = min(rates[bottom] / 10, rates[steepest] * 3)
    note = "the loss was still falling at the last rate: probe higher" if bottom == len(rates) - 1 else ""
    return {"rates": rates, "losses": losses, "smoothed": smoothed, "bottom": rates[bottom], "steepest": rates[steepest],
            "suggested": suggested, "note": note}  # fmt: skip


def range_test(model: str, method: str, data_path: str, batch_size: int, steps: int = 30, max_length: int = 512, cfg=None,
               low: float = 1e-7, high: float = 1.0, workdir: str | None = None) -> dict:  # fmt: skip
    """Train ``steps`` steps of ``method`` on ``model`` (a shipped pool name or a model folder) and
    ``data_path``, the rate growing from ``low`` to ``high``, and pick from the losses. A loss
    that diverges ends the test where it did."""
    import csv
    import tempfile
    from pathlib import Path

    from tunelab.config import compose_config
    from tunelab.engine import train
    from tunelab.errors import TunelabError

    if steps < 5:
        raise UsageError(f"--probe-steps {steps}: give at least 5.")
    methods = {"full": "fullfinetune_sft", "lora": "peftfinetune_sft", "qlora": "peftfinetune_sft"}
    if method not in methods:
        raise UsageError(f"--probe runs supervised fine-tuning: --method full, lora or qlora (not {method}).")
    pool = [f"modelpool=CausalLMPool/{model}"] if not Path(model).exists() else ["modelpool=CausalLMPool/smollm2-135m", f"modelpool.model_path={model}"]
    if method == "qlora":
        pool.append("modelpool.quantization=nf4")
    data = cfg or {}
    out = Path(workdir or tempfile.mkdtemp(prefix="tunelab-lr-probe-"))
    gamma = (high / low) ** (1 / (steps - 1))
    overrides = pool + [
        f"method=lm_finetune/{methods[method]}", f"data.path={data_path}", f"method.max_steps={steps}", "method.max_epochs=-1",
        f"method.dataloader_kwargs.batch_size={batch_size}", f"method.max_length={max_length}", f"method.optimizer.lr={low}",
        "~method.lr_scheduler", f"+method.lr_scheduler={{_target_:tunelab.optim.lr_scheduler.ExponentialRamp,T_max:{steps - 1},start_lr:{low},end_lr:{high}}}",
        "method.gradient_clip_val=null",
        "taskpool=dummy", f"output_dir={out}", "overwrite=true", "progress_bar=false", "data.shuffle=true",
        "method.checkpoint_save_interval=step", f"method.checkpoint_save_frequency={steps + 1}",
        *[f"data.{k}={v}" for k, v in data.items() if v is not None],
    ]  # fmt: skip
    try:
        train(compose_config(overrides))
    except TunelabError as err:
        if "training loss became" not in str(err):
            raise
    with (out / "metrics.csv").open() as rows:
        rows = [r for r in csv.DictReader(rows) if r.get("train/loss") and r.get("train/lr")]
    # the loss of step k was computed at the rate before that step's scheduler update
    rates = [low * gamma ** (int(r["step"]) - 1) for r in rows]
    result = pick_from_range_test(rates, [float(r["train/loss"]) for r in rows])
    result["run"] = str(out)
    return result
