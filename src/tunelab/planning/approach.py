"""Which approach fits a use case: prompting, retrieval, fine-tuning, or fine-tuning with retrieval.

A profile describes the use case by the factors that decide it (every one optional but
``examples``):

    examples: 800            # labelled input -> output examples at hand
    knowledge: changing      # none | static | changing: facts the answers need beyond the base's
    citations: false         # answers must point to their sources
    task: moderate           # simple | moderate | complex
    format: true             # a strict output format, style or tone the base does not keep to
    latency_ms: 300          # the limit per request, if any
    requests_per_day: 200000
    budget: medium           # low | medium | high: training compute and time

Each rule adds to or takes from an approach's score and says why; the highest score wins, and
fine-tuning and retrieval both strong make the hybrid. These are rules of thumb (the reasons say
where each comes from); they weigh the factors, they do not measure them.
"""

from dataclasses import dataclass, field, fields

from tunelab.errors import UsageError

APPROACHES = ("prompting", "retrieval", "fine-tuning", "fine-tuning + retrieval")
CHOICES = {"knowledge": ("none", "static", "changing"), "task": ("simple", "moderate", "complex"), "budget": ("low", "medium", "high")}


@dataclass
class Profile:
    examples: int
    knowledge: str = "none"
    citations: bool = False
    task: str = "moderate"
    format: bool = False
    latency_ms: int | None = None
    requests_per_day: int | None = None
    budget: str = "medium"

    @classmethod
    def from_dict(cls, values: dict, source: str = "the profile") -> "Profile":
        """A profile from a mapping, every field checked: unknown names, missing ``examples``,
        wrong types and values outside the choices are refused, by name."""
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise UsageError(f"{source}: unknown field{'s' * (len(unknown) > 1)} {', '.join(unknown)}; the fields are {', '.join(known)}.")
        if values.get("examples") is None:
            raise UsageError(f"{source}: examples is required (how many labelled input -> output examples you have; 0 if none).")
        for name, value in values.items():
            if value is None:
                continue
            if name in CHOICES and value not in CHOICES[name]:
                raise UsageError(f"{source}: {name}={value!r}; choose {', '.join(CHOICES[name])}.")
            if name in ("citations", "format") and not isinstance(value, bool):
                raise UsageError(f"{source}: {name}={value!r}; give true or false.")
            if name in ("examples", "latency_ms", "requests_per_day") and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise UsageError(f"{source}: {name}={value!r}; give a whole number, 0 or more.")
        return cls(**values)


@dataclass
class Recommendation:
    approach: str
    scores: dict[str, int]
    reasons: list[tuple[str, int, str]] = field(default_factory=list)  # (approach, points, why)

    def render(self) -> str:
        lines = [f"Recommended: {self.approach}", "", "Scores: " + ", ".join(f"{a} {s:+d}" for a, s in self.scores.items()), "", "Why:"]
        lines += [f"  {points:+d} {approach}: {why}" for approach, points, why in self.reasons]
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {"approach": self.approach, "scores": self.scores, "reasons": [{"approach": a, "points": p, "why": w} for a, p, w in self.reasons]}


def recommend(profile: Profile) -> Recommendation:
    """The approach for ``profile``, with every rule that moved a score and why."""
    reasons: list[tuple[str, int, str]] = []

    def rule(approach: str, points: int, why: str) -> None:
        reasons.append((approach, points, why))

    rule("prompting", 1, "the cheapest start: no training and no index, and the baseline any other approach must beat")
    if profile.knowledge == "changing":
        rule("retrieval", 3, "facts that change must come from an index you update without training; facts trained into weights go stale")
    elif profile.knowledge == "static":
        rule("retrieval", 1, "stable domain facts can be retrieved ...")
        rule("fine-tuning", 1, "... or trained in (continued pretraining on the domain's text, then SFT)")
    if profile.citations:
        rule("retrieval", 2, "answers that cite sources need the passages they come from at answer time")
    if profile.format:
        rule("fine-tuning", 2, "a format, style or tone the base does not keep to from instructions is what supervised fine-tuning fixes most reliably")
    if profile.examples < 50:
        rule("fine-tuning", -3, f"{profile.examples} examples: too few to fine-tune on (a few dozen are memorised, not learned); use them as few-shot examples")
        rule("prompting", 1, "a handful of examples fits in the prompt as demonstrations")
    elif profile.examples >= 5000:
        rule("fine-tuning", 2, f"{profile.examples} examples: enough for a full fine-tune or LoRA to learn the task, not only the format")
    elif profile.examples >= 500:
        rule("fine-tuning", 1, f"{profile.examples} examples: enough for LoRA to learn a format and a narrow task")
    if profile.task == "complex" and profile.examples < 1000:
        rule("prompting", 1, "multi-step reasoning with under 1000 examples: a larger model prompted step by step usually beats a small one tuned on few")
    if profile.task == "simple" and profile.examples >= 200:
        rule("fine-tuning", 1, "a simple task (classification, extraction): a small tuned model matches a large prompted one at a fraction of the cost")
    if profile.latency_ms is not None and profile.latency_ms < 500:
        rule("fine-tuning", 1, f"{profile.latency_ms} ms per request: a tuned small model answers from a short prompt")
        rule("prompting", -1, "few-shot demonstrations lengthen every prompt, and the time to its first token")
        rule("retrieval", -1, "a search before every answer, and the passages it adds to the prompt, cost time")
    if profile.requests_per_day is not None and profile.requests_per_day >= 100_000:
        rule("fine-tuning", 1, f"{profile.requests_per_day:,} requests a day: instructions and demonstrations paid on every request cost more than training once")
    if profile.budget == "low":
        rule("fine-tuning", -1, "a low training budget: start with prompting or retrieval, fine-tune when they fall short")
    elif profile.budget == "high":
        rule("fine-tuning", 1, "a high budget allows iterating on data and runs")

    scores = {a: 0 for a in APPROACHES[:3]}
    for approach, points, _ in reasons:
        scores[approach] += points
    if scores["fine-tuning"] >= 2 and scores["retrieval"] >= 2:
        approach = "fine-tuning + retrieval"
        reasons.append((approach, 0, "both are strong: fine-tune for format and task, retrieve for the facts (retrieval-augmented fine-tuning)"))
    else:
        approach = max(APPROACHES[:3], key=lambda a: (scores[a], -APPROACHES.index(a)))  # ties: the cheaper approach
    return Recommendation(approach, scores, reasons)
