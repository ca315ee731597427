from tunelab.methods.bradley_terry_rm import BradleyTerryRewardModeling, bradley_terry_loss
from tunelab.methods.dpo import DirectPreferenceOptimization, preference_losses, sequence_log_probs
from tunelab.methods.fullfinetune_sft import FullFinetuneSFT, causal_lm_loss
from tunelab.methods.grpo import GroupRelativePolicyOptimization
from tunelab.methods.peftfinetune_sft import PeftFinetuneSFT
from tunelab.methods.ppo import ProximalPolicyOptimization
from tunelab.methods.pretrain import CausalLMPretrain

__all__ = [
    "BradleyTerryRewardModeling",
    "CausalLMPretrain",
    "DirectPreferenceOptimization",
    "FullFinetuneSFT",
    "GroupRelativePolicyOptimization",
    "PeftFinetuneSFT",
    "ProximalPolicyOptimization",
    "bradley_terry_loss",
    "causal_lm_loss",
    "preference_losses",
    "sequence_log_probs",
]
