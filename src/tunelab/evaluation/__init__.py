from tunelab.evaluation.taskpool import DummyTaskPool, HeldoutLossTaskPool, HeldoutRewardTaskPool, TaskPool

__all__ = ["DummyTaskPool", "HeldoutLossTaskPool", "HeldoutRewardTaskPool", "TaskPool"]
