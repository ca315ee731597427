from tunelab.evaluation.taskpool import DummyTaskPool, HeldoutLossTaskPool, TaskPool

__all__ = ["DummyTaskPool", "HeldoutLossTaskPool", "TaskPool"]
