from tunelab.models.pool import CausalLMPool

__all__ = ["CausalLMPool"]
