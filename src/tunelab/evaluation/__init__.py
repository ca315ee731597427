from tunelab.evaluation.taskpool import DummyTaskPool, GenerationTaskPool, GSM8KTaskPool, HeldoutLossTaskPool, HeldoutRewardTaskPool, TaskPool

__all__ = ["DummyTaskPool", "GSM8KTaskPool", "GenerationTaskPool", "HeldoutLossTaskPool", "HeldoutRewardTaskPool", "TaskPool"]
