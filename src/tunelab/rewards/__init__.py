"""Reward functions for online RL (GRPO, PPO): checks a program can make, and reward models.

A reward function is any callable ``f(prompts, completions, **columns) -> list[float | None]``:
``prompts`` are the prompt conversations (lists of {role, content}), ``completions`` the generated
texts, and the keyword arguments the data record's other fields (GSM8K's ``answer``) plus
``completion_ids``; a function receives only the keywords it names (or all, with ``**kwargs``).
None means "does not apply to this completion" and leaves it out of that function's mean.
"""

from tunelab.rewards.reward_model import RewardModel
from tunelab.rewards.verifiable import LengthPenalty, RegexFormat, gsm8k_exact_match, gsm8k_final_number

__all__ = ["LengthPenalty", "RegexFormat", "RewardModel", "gsm8k_exact_match", "gsm8k_final_number"]
