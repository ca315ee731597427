from tunelab.models.pool import CausalLMPool, SequenceClassificationModelPool

__all__ = ["CausalLMPool", "SequenceClassificationModelPool"]
