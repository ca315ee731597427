from tunelab.evaluation.taskpool import DummyTaskPool, HeldoutLossTaskPool

__all__ = ["DummyTaskPool", "HeldoutLossTaskPool"]
