"""Where a run's metrics go besides ``metrics.csv`` (always written): Lightning's loggers, chosen
by name in ``logger`` (``logger=[tensorboard,csv,mlflow]``).

- ``tensorboard`` (default): TensorBoard event files in ``OUT/tensorboard``;
- ``csv``: Lightning's CSV logger in ``OUT/csv`` (``metrics.csv`` is tunelab's own and always there);
- ``mlflow``: an MLflow run (``pip install 'tunelab[mlflow]'``), in ``mlflow.tracking_uri`` (default
  ``$MLFLOW_TRACKING_URI``, else the SQLite store ``runs/mlflow.db``; MLflow 3 refuses its old
  file store), experiment ``mlflow.experiment``, named after the output folder, with the resolved
  config as parameters;
- ``wandb``: a Weights & Biases run (``pip install wandb``, then ``wandb login`` or
  ``WANDB_MODE=offline``), project ``wandb.project``.
"""

import os
from pathlib import Path

from tunelab.errors import UsageError

KNOWN = ("tensorboard", "csv", "mlflow", "wandb")


def build_loggers(cfg, out: Path) -> list:
    """The Lightning loggers ``cfg.logger`` names, for a run writing to ``out``."""
    names = cfg.get("logger", ["tensorboard"])
    names = [names] if isinstance(names, str) else list(names or [])
    unknown = [n for n in names if n not in KNOWN]
    if unknown:
        raise UsageError(f"logger={names}: {', '.join(map(str, unknown))} unknown; choose from {', '.join(KNOWN)} (e.g. logger=[tensorboard,mlflow]).")
    loggers = []
    for name in dict.fromkeys(names):
        if name == "tensorboard":
            from lightning.fabric.loggers import TensorBoardLogger

            loggers.append(TensorBoardLogger(root_dir=str(out), name="tensorboard", version=""))
        elif name == "csv":
            from lightning.fabric.loggers import CSVLogger

            loggers.append(CSVLogger(root_dir=str(out), name="csv", version=""))
        elif name == "mlflow":
            loggers.append(_mlflow(cfg, out))
        else:
            loggers.append(_wandb(cfg, out))
    return loggers


def _mlflow(cfg, out: Path):
    try:
        import mlflow  # noqa: F401
    except ImportError:
        raise UsageError("logger=mlflow needs MLflow: pip install 'tunelab[mlflow]' (mlflow-skinny and alembic), or drop mlflow from logger.") from None
    from lightning.pytorch.loggers import MLFlowLogger

    options = cfg.get("mlflow") or {}
    default = Path("runs/mlflow.db").resolve()
    uri = options.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{default}"
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    return MLFlowLogger(experiment_name=options.get("experiment") or "tunelab", run_name=Path(out).name, tracking_uri=uri)


def _wandb(cfg, out: Path):
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise UsageError("logger=wandb needs Weights & Biases: pip install wandb (then wandb login, or WANDB_MODE=offline).") from None
    from lightning.pytorch.loggers import WandbLogger

    options = cfg.get("wandb") or {}
    return WandbLogger(project=options.get("project") or "tunelab", name=Path(out).name, save_dir=str(out))


def log_config(loggers: list, config: dict) -> None:
    """The resolved config as each tracker's run parameters, named as on the command line
    (``method.optimizer.lr``); TensorBoard and CSV runs keep config.yaml beside them."""
    flat = {}

    def walk(node, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            flat[prefix[:-1]] = node if isinstance(node, (int, float, str, bool)) or node is None else str(node)

    walk(config, "")
    for logger in loggers:
        if type(logger).__name__ in ("MLFlowLogger", "WandbLogger"):
            logger.log_hyperparams(flat)


def finish(loggers: list, status: str) -> None:
    """Close each logger's run (``success``, ``failed``, or ``KILLED`` for a stopped run): MLflow marks the run so."""
    for logger in loggers:
        logger.finalize(status)
