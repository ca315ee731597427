from tunelab.methods.fullfinetune_sft import FullFinetuneSFT, causal_lm_loss

__all__ = ["FullFinetuneSFT", "causal_lm_loss"]
