from tunelab.methods.fullfinetune_sft import FullFinetuneSFT, causal_lm_loss
from tunelab.methods.peftfinetune_sft import PeftFinetuneSFT

__all__ = ["FullFinetuneSFT", "PeftFinetuneSFT", "causal_lm_loss"]
