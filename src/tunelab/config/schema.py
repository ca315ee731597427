"""Typed schema of a run's config.

The nodes that have a ``_target_`` (method, modelpool, taskpool, fabric, optimizer, ...) are
checked against the signature of what they build; the rest of the tree is described here.
"""

from dataclasses import dataclass, field
from typing import Any, Literal, Optional

DataFormat = Literal["alpaca", "sharegpt", "openai", "prompt_completion", "text", "preference", "prompt"]


@dataclass
class DataConfig:
    path: Optional[str] = None
    """Training file: JSON lines, a JSON array, Parquet or CSV."""
    format: DataFormat = "prompt_completion"
    """How a record becomes a conversation or a text."""
    prompt_field: str = "prompt"
    """prompt_completion and prompt: the field holding the prompt (prompt: a string, a list of
    {role, content} messages, or an HH-style '\\n\\nHuman: ...' transcript)."""
    completion_field: str = "completion"
    """prompt_completion: the field holding the supervised answer."""
    messages_field: Optional[str] = None
    """sharegpt / openai: the field holding the turns (default conversations / messages)."""
    text_field: str = "text"
    """text: the field holding raw text (a .txt or .md file is read as one record per blank-line
    separated paragraph)."""
    system_prompt: Optional[str] = None
    """A system message put before every conversation that has none."""
    max_samples: Optional[int] = None
    """Take only the first N records of the file."""
    shuffle: bool = True
    """Shuffle the training examples every epoch (seeded by data.seed and the epoch)."""
    seed: int = 42
    """Seed of the shuffle and of the validation split."""
    group_by_length: bool = False
    """Put examples of similar length in the same batch (in groups of 64 batches) to cut padding;
    it changes which examples share a step. Packing (method.packing) removes padding altogether."""
    overlong: Literal["truncate", "drop"] = "truncate"
    """What to do with an example longer than method.max_length."""
    validate: bool = True
    """Run the cheap checks of `tunelab data validate` on the training file (and val_path, and
    every source of a mixture) before loading a model: errors (unreadable lines, wrong fields, empty
    answers, conversations without an assistant turn) stop the run with their lines, warnings are
    logged; false skips them."""
    val_fraction: float = 0.0
    """Hold out this fraction of the records (after max_samples) as the validation split."""
    val_path: Optional[str] = None
    """A separate validation file, in the same format (overrides val_fraction)."""
    max_val_samples: Optional[int] = None
    """Cap the validation split at N examples."""
    cross_document_attention: bool = True
    """Pretraining (text blocks): a block's tokens attend to the earlier documents in the same
    block; false keeps attention inside each document, with positions restarting at its start
    (needs method.packing=true)."""
    sources: Optional[list] = None
    """A mixture (data=mixture): a list of sources, each a mapping with its own path, format
    and field options, plus weight (default 1), role (task or replay) and name; the other data
    options apply to every source unless the source sets them. data.path must then be null."""
    mixing: Literal["proportional", "equal", "temperature"] = "proportional"
    """How sources share an epoch: proportional (weight x size), equal (weight), or temperature
    ((weight x size) ** (1 / data.temperature))."""
    temperature: float = 2.0
    """data.mixing=temperature: 1 is proportional, larger values approach equal."""
    epoch_size: Optional[int] = None
    """Examples drawn per epoch from the mixture (null: every source's examples once)."""
    replay_ratio: Optional[float] = None
    """Share of every epoch drawn from the sources with role: replay (general data mixed in
    against forgetting); the task sources share the rest."""
    num_proc: int = 1
    """Processes for tokenization."""
    cache_dir: Optional[str] = None
    """Where tokenized data is cached (default: $TUNELAB_CACHE/datasets)."""


@dataclass
class MLflowConfig:
    tracking_uri: Optional[str] = None
    """Where runs go: null for $MLFLOW_TRACKING_URI, else the SQLite store runs/mlflow.db."""
    experiment: str = "tunelab"
    """The MLflow experiment the run is logged under."""


@dataclass
class WandbConfig:
    project: str = "tunelab"
    """The Weights & Biases project."""


@dataclass
class RunConfig:
    method: Any = None
    modelpool: Any = None
    taskpool: Any = None
    fabric: Any = None
    data: DataConfig = field(default_factory=DataConfig)
    output_dir: str = "runs/default"
    """Where checkpoints, metrics and plots go."""
    overwrite: bool = False
    """Allow writing into an output_dir that already holds another run."""
    seed: int = 42
    """Seed of model init, dropout and everything else random in the run."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about 30% more compute."""
    log_every_n_steps: int = 1
    """Write metrics every N optimizer steps."""
    progress_bar: bool = True
    """Show a progress bar on rank 0."""
    peak_tflops: Optional[float] = None
    """The device's peak TFLOP/s in the run's precision, for the model FLOPs utilisation
    (train/mfu) of methods that report one (pretraining), e.g. 989 for an H100's dense bf16;
    null: this device's measured matmul speed (MFU then reads as a share of what matmuls reach here)."""
    cpu_allocator: Literal["tuned", "system"] = "tuned"
    """On CPU with glibc: tuned keeps freed memory in the process and fixes malloc's mmap
    threshold, so steps stop page-faulting their buffers in (faster, less fragmentation); with a
    quantised base (modelpool.quantization) the threshold is 1 MiB instead, so the weights it
    dequantises in every pass do not fragment the heap (QLoRA's peak memory about halves);
    system leaves malloc as it is."""
    logger: Any = field(default_factory=lambda: ["tensorboard"])
    """Where metrics go besides metrics.csv: any of tensorboard, csv, mlflow, wandb
    (logger=[tensorboard,mlflow])."""
    mlflow: MLflowConfig = field(default_factory=lambda: MLflowConfig())
    wandb: WandbConfig = field(default_factory=lambda: WandbConfig())
