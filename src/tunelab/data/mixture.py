"""Several data sources mixed in one run (``data.sources``), with a mix that is fixed per epoch,
deterministic and exactly resumable.

Each source is built on its own (its path, format and fields), and the training sets are
concatenated. A source's share of an epoch comes from its weight ``w`` and size ``n`` (examples):

- ``proportional``: share ~ w * n (with weights 1, the sources' natural proportions);
- ``equal``: share ~ w (with weights 1, every source the same share);
- ``temperature``: share ~ (w * n) ** (1 / T): T = 1 is proportional, large T approaches equal.

Sources with ``role: eval`` are not trained on: all their examples are held out, and evaluated
on their own (a general set that shows what a run forgets). Sources with ``role: replay``
(general data kept in the mix against forgetting) get together
``data.replay_ratio`` of every epoch, split among them by the same rule; the task sources share
the rest. An epoch draws ``data.epoch_size`` examples (default: all the sources' examples once);
a source drawn more often than it has examples is repeated whole, then topped up with a random
part of it, and one drawn less often gives a different random part in every epoch. The epoch's
order depends only on (seed, epoch), so a resumed run draws exactly what it would have drawn.
"""

import bisect
import math
import random
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable

import datasets

from tunelab.errors import TunelabError

MIXING = ("proportional", "equal", "temperature")
ROLES = ("task", "replay", "eval")
# Formats whose examples one method trains on together: SFT-style (input_ids, labels), preference
# pairs (reward models, DPO), prompts to generate from (GRPO, PPO).
FORMAT_FAMILIES = {
    "alpaca": "conversation", "sharegpt": "conversation", "openai": "conversation", "prompt_completion": "conversation",
    "text": "conversation", "preference": "preference pair", "prompt": "prompt",
}  # fmt: skip


@dataclass
class MixtureReport:
    """The mix of one epoch, per source, and where each source's examples sit in the
    concatenated training and validation sets (what the sampler and the per-source evaluation use)."""

    names: list[str] = field(default_factory=list)
    roles: list[str] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    """Training examples each source holds."""
    shares: list[float] = field(default_factory=list)
    """Each source's share of an epoch (its probability under data.mixing)."""
    counts: list[int] = field(default_factory=list)
    """Examples drawn from each source per epoch (the shares, rounded to sum to the epoch size)."""
    tokens: list[int] = field(default_factory=list)
    """Tokens of the examples drawn in the first epoch, per source."""
    offsets: list[int] = field(default_factory=list)
    val_offsets: list[int] = field(default_factory=list)
    val_sizes: list[int] = field(default_factory=list)
    mixing: str = "proportional"
    realised: dict = field(default_factory=dict)
    """Filled at the end of the run: examples and tokens trained on per source."""

    def epoch_indices(self, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
        """Indices (into the concatenated training set) drawn in ``epoch``, in training order."""
        rng = random.Random(seed * 100_003 + epoch)
        drawn: list[int] = []
        for offset, size, count in zip(self.offsets, self.sizes, self.counts):
            if not count:
                continue
            passes, rest = divmod(count, size)
            picks = list(range(size)) * passes
            if rest:
                picks += rng.sample(range(size), rest)
            drawn += [offset + i for i in picks]
        if shuffle:
            rng.shuffle(drawn)
        return drawn

    def source_of(self, index: int) -> int:
        return bisect.bisect_right(self.offsets, index) - 1  # the last source starting at or before it (empty ones skipped)


def mixture_shares(sizes: list[int], weights: list[float], mixing: str, temperature: float = 1.0) -> list[float]:
    """Each source's probability under ``mixing`` (see the module docstring)."""
    if mixing == "proportional":
        raw = [w * n for w, n in zip(weights, sizes)]
    elif mixing == "equal":
        raw = list(weights)
    elif mixing == "temperature":
        if temperature <= 0:
            raise TunelabError(f"data.temperature={temperature} must be positive (1: proportional; larger values approach equal).")
        raw = [(w * n) ** (1 / temperature) for w, n in zip(weights, sizes)]
    else:
        raise TunelabError(f"data.mixing={mixing!r} is not one of: {', '.join(MIXING)}.")
    total = sum(raw)
    return [r / total for r in raw]


def allocate(shares: list[float], total: int) -> list[int]:
    """Whole example counts in proportion to ``shares`` that sum to ``total`` (largest remainders)."""
    exact = [s * total for s in shares]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(shares)), key=lambda i: exact[i] - counts[i], reverse=True)
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def _source_configs(cfg) -> list[tuple[str, str, float, object]]:
    """(name, role, weight, DataConfig) per entry of ``data.sources``: the entry's own options over
    the run's data options (so data.val_fraction=0.05 holds out 5% of every source)."""
    from tunelab.config.schema import DataConfig

    mixture_only = {"sources", "mixing", "temperature", "epoch_size", "replay_ratio"}
    allowed = {f.name for f in fields(DataConfig)} - mixture_only
    base = {f.name: getattr(cfg, f.name) for f in fields(DataConfig) if f.name not in mixture_only}
    out = []
    for i, source in enumerate(cfg.sources):
        where = f"data.sources[{i}]"
        if not isinstance(source, dict) or not source.get("path"):
            raise TunelabError(f"{where} must be a mapping with at least a path, e.g. {{path: train.jsonl, format: alpaca, weight: 1}}.")
        source = dict(source)
        name = str(source.pop("name", None) or Path(str(source["path"])).stem)
        if name in [n for n, _, _, _ in out]:
            name = f"{name}-{i}"
        role = source.pop("role", "task")
        weight = source.pop("weight", 1.0)
        unknown = sorted(set(source) - allowed)
        if unknown:
            raise TunelabError(f"{where} has unknown option(s) {', '.join(unknown)}; a source takes name, role, weight and: {', '.join(sorted(allowed))}.")
        if role not in ROLES:
            raise TunelabError(f"{where}.role={role!r} is not one of: {', '.join(ROLES)}.")
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not weight > 0 or not math.isfinite(weight):
            raise TunelabError(f"{where}.weight={weight!r}: a weight must be a positive number (drop the source to leave it out).")
        source_cfg = DataConfig(**{**base, "val_path": None, "val_fraction": base["val_fraction"], **source})
        if source_cfg.format not in FORMAT_FAMILIES:
            raise TunelabError(f"{where}.format={source_cfg.format!r} is not a known format: use {', '.join(FORMAT_FAMILIES)}.")
        out.append((name, role, float(weight), source_cfg))
    return out


def check_mixture_options(cfg) -> None:
    if cfg.path:
        raise TunelabError("data.path and data.sources are both set: a mixture names its files in data.sources; set data.path=null.")
    if not isinstance(cfg.sources, (list, tuple)) or not cfg.sources:
        raise TunelabError("data.sources must be a non-empty list of sources ({path, format, weight}).")
    if cfg.epoch_size is not None and cfg.epoch_size < 1:
        raise TunelabError(f"data.epoch_size={cfg.epoch_size} must be a positive number of examples (null: every source's examples once).")
    if cfg.replay_ratio is not None and not 0 < cfg.replay_ratio < 1:
        raise TunelabError(f"data.replay_ratio={cfg.replay_ratio} must be between 0 and 1 (the share of every epoch drawn from replay sources).")


def build_mixture(cfg, build_one: Callable, what_trains: str = "this method"):
    """``data.sources`` -> (training set, validation set or None, per-source reports, MixtureReport).

    ``build_one(source_cfg)`` builds one source as the method builds a single file (train, val,
    report); the sets are concatenated in source order.
    """
    check_mixture_options(cfg)
    sources = _source_configs(cfg)
    families = {FORMAT_FAMILIES[c.format] for _, _, _, c in sources}
    if len(families) > 1:
        listing = "; ".join(f"{name}: format={c.format} ({FORMAT_FAMILIES[c.format]}s)" for name, _, _, c in sources)
        raise TunelabError(
            f"data.sources mixes formats that need different methods ({listing}). One run trains on one kind of example: "
            "conversations and text (SFT), preference pairs (reward model, DPO) or prompts (GRPO, PPO)."
        )
    roles = [role for _, role, _, _ in sources]
    replay = [i for i, role in enumerate(roles) if role == "replay"]
    task = [i for i, role in enumerate(roles) if role == "task"]
    if cfg.replay_ratio is not None and not replay:
        raise TunelabError("data.replay_ratio is set but no source has role: replay; mark the general-data source with role: replay.")
    if not task and (cfg.replay_ratio is not None or not replay):
        raise TunelabError("No source has role: task, so there is nothing to train on: give the task's source role: task (the default).")
    built = []
    for (_, role, _, _), source in zip(sources, (s[3] for s in sources)):
        train, val, source_report = build_one(source)
        if role == "eval":  # held out whole: its examples are evaluated, never trained on
            val = train if val is None else datasets.concatenate_datasets([train, val])
            train = train.select([])
            held, empty = source_report.train, type(source_report.train)()
            for name in held.__dataclass_fields__:  # its report's counts move to the validation side
                setattr(held, name, getattr(held, name) + getattr(source_report.val, name))
            source_report.train, source_report.val = empty, held
        built.append((train, val, source_report))
    report = MixtureReport(names=[s[0] for s in sources], roles=roles, weights=[s[2] for s in sources], mixing=cfg.mixing)
    report.sizes = [len(train) for train, _, _ in built]
    report.shares = [0.0] * len(sources)
    groups = [(replay, cfg.replay_ratio), (task, 1 - cfg.replay_ratio)] if cfg.replay_ratio is not None else [(replay + task, 1.0)]
    for group, part in groups:
        group = sorted(group)
        shares = mixture_shares([report.sizes[i] for i in group], [report.weights[i] for i in group], cfg.mixing, cfg.temperature)
        for i, share in zip(group, shares):
            report.shares[i] = part * share
    report.counts = allocate(report.shares, cfg.epoch_size or sum(report.sizes))
    report.offsets = [sum(report.sizes[:i]) for i in range(len(sources))]
    train = datasets.concatenate_datasets([t for t, _, _ in built])
    vals = [v for _, v, _ in built]
    val = None
    if any(v is not None for v in vals):
        report.val_sizes = [len(v) if v is not None else 0 for v in vals]
        report.val_offsets = [sum(report.val_sizes[:i]) for i in range(len(vals))]
        val = datasets.concatenate_datasets([v for v in vals if v is not None and len(v)])
    lengths = [len(ids) for ids in train["input_ids"]] if "input_ids" in train.column_names else None
    first_epoch = realised_mix(report, lengths, cfg.seed, False, 0, sum(report.counts))
    report.tokens = [first_epoch[name]["tokens"] for name in report.names]
    return train, val, [r for _, _, r in built], report


def realised_mix(report: MixtureReport, lengths: list[int] | None, seed: int, shuffle: bool, epochs: int, consumed: int) -> dict:
    """Examples and tokens trained on per source: ``epochs`` whole epochs and the first
    ``consumed`` examples of the next one."""
    examples = [0] * len(report.names)
    tokens = [0] * len(report.names)
    for epoch in range(epochs + 1):
        order = report.epoch_indices(seed, epoch, shuffle)
        for index in order if epoch < epochs else order[:consumed]:
            source = report.source_of(index)
            examples[source] += 1
            tokens[source] += lengths[index] if lengths else 0
    return {name: {"examples": e, "tokens": t} for name, e, t in zip(report.names, examples, tokens)}
