"""tunelab: adapt pretrained language models on one Lightning Fabric engine."""

from tunelab.errors import TunelabError

__all__ = ["TunelabError"]
__version__ = "0.1.0"
