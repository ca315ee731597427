from tunelab.optim.lr_scheduler import CosineDecayWithWarmup

__all__ = ["CosineDecayWithWarmup"]
