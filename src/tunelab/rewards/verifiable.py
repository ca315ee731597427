"""Rewards a program can check: GSM8K's final number, a format given as a regular expression, and
a length penalty. Each is called as ``f(prompts, completions, **columns)`` and returns one float
(or None: "this function does not apply here") per completion."""

import re

_FINAL = re.compile(r"####\s*(-?[\d,]*\.?\d+)")


def gsm8k_final_number(text: str) -> str | None:
    """The number after GSM8K's '#### ' marker (commas dropped, '72.0' read as '72'), or None."""
    found = _FINAL.findall(text or "")
    if not found:
        return None
    number = found[-1].replace(",", "")
    if "." in number:
        number = number.rstrip("0").rstrip(".") or "0"
    return number


def gsm8k_exact_match(prompts: list, completions: list[str], answer: list[str], **_) -> list[float]:
    """1.0 where the completion's '#### <n>' equals the reference answer's, else 0.0 (a completion
    without the marker scores 0). ``answer`` is the record's GSM8K answer field."""
    return [float(gsm8k_final_number(c) is not None and gsm8k_final_number(c) == gsm8k_final_number(a)) for c, a in zip(completions, answer)]


class RegexFormat:
    """``reward`` where the completion matches ``pattern`` (re.search, or the whole completion with
    ``fullmatch=True``), else 0. The default asks for GSM8K's answer line."""

    def __init__(self, pattern: str = r"####\s*-?[\d,]*\.?\d+\s*$", reward: float = 1.0, fullmatch: bool = False, flags: str = "MS"):
        self.pattern = re.compile(pattern, sum(getattr(re, f) for f in flags))
        self.reward, self.fullmatch = reward, fullmatch
        self.__name__ = f"regex_format({pattern!r})"

    def __call__(self, prompts: list, completions: list[str], **_) -> list[float]:
        match = self.pattern.fullmatch if self.fullmatch else self.pattern.search
        return [self.reward if match(c.strip()) else 0.0 for c in completions]


class LengthPenalty:
    """0 up to ``max_tokens`` completion tokens, then ``-scale`` times the share over the limit
    (so a completion twice as long as the limit scores ``-scale``)."""

    def __init__(self, max_tokens: int = 256, scale: float = 1.0):
        if max_tokens <= 0:
            raise ValueError(f"max_tokens={max_tokens} must be positive")
        self.max_tokens, self.scale = max_tokens, scale
        self.__name__ = f"length_penalty({max_tokens})"

    def __call__(self, prompts: list, completions: list[str], completion_ids: list[list[int]], **_) -> list[float]:
        return [-self.scale * max(0, len(ids) - self.max_tokens) / self.max_tokens for ids in completion_ids]
