from tunelab.engine.checkpoint import TrainState, load_checkpoint, save_checkpoint
from tunelab.engine.method import DataSplits, LossResult, Method, Models
from tunelab.engine.options import TrainingOptions
from tunelab.engine.trainer import RunResult, check_run, fit, train

__all__ = [
    "DataSplits",
    "LossResult",
    "Method",
    "Models",
    "RunResult",
    "TrainState",
    "TrainingOptions",
    "check_run",
    "fit",
    "load_checkpoint",
    "save_checkpoint",
    "train",
]
