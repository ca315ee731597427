"""The demo: fine-tune SmolLM2-135M-Instruct on GSM8K problems shipped with tunelab.

Before and after training, on the held-out problems the run never trains on: the held-out loss,
and greedy answers scored as GSM8K is scored (the share written in its ``#### <number>`` format,
the share whose final number is right). The first held-out problem's answers are shown as they
came out, before and after; a greedy answer that cycles through one phrase is stopped by the loop
guard and reported as a loop, not as an answer.
"""

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from tunelab.config import DataConfig, compose_config
from tunelab.data import load_examples
from tunelab.resources import resolve_path

DEMO_DATA = "pkg://tunelab/demo_data/gsm8k_demo.jsonl"
MAX_NEW_TOKENS = 256  # GSM8K's worked answers in the demo data are at most ~200 tokens
QUICK_MAX_NEW_TOKENS = 16


def demo_overrides(output_dir: str, quick: bool) -> list[str]:
    common = [
        "data=gsm8k-demo", "taskpool=heldout-loss", "taskpool.every_n_steps=0",
        f"output_dir={output_dir}", "overwrite=true", "method.max_epochs=3",
        "method.dataloader_kwargs.batch_size=8", "method.max_length=384",
        "method.optimizer.lr=2e-4", "method.lr_scheduler.warmup_steps=2", "method.save_ckpt_type=hf",
    ]  # fmt: skip
    if quick:
        return common + ["modelpool=CausalLMPool/tiny-llama", "method.max_steps=3", "data.max_samples=40"]
    # fabric.precision=auto: bf16 autocast where the CPU computes bf16 natively (AVX-512 BF16), fp32 elsewhere.
    return common + ["modelpool=CausalLMPool/smollm2-135m", "fabric.precision=auto"]


def held_out_items(data_cfg: dict) -> list:
    """The demo's validation split (the engine never trains on it) as evaluation items."""
    from tunelab.evaluation.items import EvalItem

    examples = load_examples(DataConfig(**data_cfg))[1]
    return [EvalItem(i, e["messages"][:-1], e["messages"][-1]["content"], messages=e["messages"]) for i, e in enumerate(examples)]


@dataclass
class AnswerScores:
    """One model's greedy answers to the held-out problems, scored as GSM8K scores them."""

    problems: int
    in_format: int  # answers that end in '#### <number>'
    right: int  # answers whose '#### <number>' is the reference's
    looped: int  # answers the loop guard stopped
    unfinished: int  # answers that ran into the token limit
    first_answer: str  # the answer to the first held-out problem, as it came out
    first_looped: bool
    seconds: float


def score_answers(model, tokenizer, items: list, max_new_tokens: int, label: str, folder: Path) -> AnswerScores:
    """Greedy answers (the model's own generation config sets no sampling) with the loop guard on;
    every answer and its scores are written to ``folder/predictions.jsonl``."""
    from tunelab.evaluation.generate import GenerationSettings, evaluate_generation
    from tunelab.evaluation.models import LocalModel
    from tunelab.progress import progress_bar

    settings = GenerationSettings(max_new_tokens=max_new_tokens, greedy=True, batch_size=20, stop_loops=True)
    with progress_bar(len(items), desc=f"Answering {len(items)} held-out problems ({label})") as bar:
        report = evaluate_generation(LocalModel(model, tokenizer, label, device="cpu"), items, ["gsm8k", "gsm8k_format"], settings,
                                     output_dir=folder, progress=bar)  # fmt: skip
    rows = report.rows
    return AnswerScores(
        len(rows), round(sum(r["scores"]["gsm8k_format"] for r in rows)), round(sum(r["scores"]["gsm8k"] for r in rows)),
        sum(r["looped"] for r in rows), sum(not r["finished"] and not r["looped"] for r in rows),
        rows[0]["prediction"], rows[0]["looped"], report.seconds,
    )  # fmt: skip


@dataclass
class DemoReport:
    model: str
    seconds: float
    steps: int
    tokens_per_s: float
    supervised_tokens_per_s: float
    loss_before: float
    loss_after: float
    question: str
    reference: str
    before: AnswerScores
    after: AnswerScores
    max_new_tokens: int
    checkpoint: Path
    metrics: Path
    loss_curve: Path | None

    def render(self) -> str:
        n = self.before.problems

        def share(count: int) -> str:
            return f"{count}/{n} ({100 * count / max(n, 1):.0f}%)"

        def shown(scores: AnswerScores) -> str:
            if scores.first_looped:
                return (f"{scores.first_answer}\n  [it loops: the answer repeats its last phrase over and over; the loop guard stopped it "
                        "after the first repetition shown here. This is not a usable answer.]")  # fmt: skip
            return scores.first_answer or "(nothing: the model ended its answer at once)"

        rows = [
            ("held-out loss", f"{self.loss_before:.4f}", f"{self.loss_after:.4f}"),
            ('answers in GSM8K\'s format ("#### <number>")', share(self.before.in_format), share(self.after.in_format)),
            ("right final number", share(self.before.right), share(self.after.right)),
            ("answers that loop (stopped by the guard)", share(self.before.looped), share(self.after.looped)),
            (f"answers cut at {self.max_new_tokens} tokens", share(self.before.unfinished), share(self.after.unfinished)),
        ]
        table = [f"  {'':<46} {'before':>12} {'after':>12}"] + [f"  {a:<46} {b:>12} {c:>12}" for a, b, c in rows]
        lines = [
            "", "=" * 76, f"tunelab demo: {self.model} fine-tuned on GSM8K", "=" * 76,
            f"trained {self.steps} steps in {self.seconds:.0f} s: {self.tokens_per_s:.0f} tokens/s, "
            f"{self.supervised_tokens_per_s:.0f} supervised tokens/s",
            "", f"on {n} held-out problems the run never trained on (greedy answers, scored as GSM8K is):", *table,
            "", f"the first held-out problem: {self.question}", "", f"reference answer: {self.reference}",
            "", f"answer before: {shown(self.before)}", "", f"answer after:  {shown(self.after)}", "",
        ]  # fmt: skip
        if self.after.first_looped or self.after.looped > n // 4:
            lines += [f"The tuned model still loops on {share(self.after.looped)} of the problems: train longer (method.max_epochs) or on more data.", ""]
        answers = Path(self.checkpoint).parents[1]
        lines += [f"checkpoint (Hugging Face format): {self.checkpoint}", f"metrics: {self.metrics}", f"loss curve: {self.loss_curve}",
                  f"every answer, scored: {answers / 'answers-before' / 'predictions.jsonl'}, {answers / 'answers-after' / 'predictions.jsonl'}"]  # fmt: skip
        return "\n".join(lines)


def run_demo(output_dir: str = "runs/demo", quick: bool = False) -> DemoReport:
    from omegaconf import OmegaConf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.config import instantiate
    from tunelab.engine import train

    resolve_path(DEMO_DATA, "the demo data")
    cfg = compose_config(demo_overrides(output_dir, quick))
    items = held_out_items(OmegaConf.to_container(cfg.data, resolve=True))
    max_new_tokens = QUICK_MAX_NEW_TOKENS if quick else MAX_NEW_TOKENS
    pool = instantiate(cfg.modelpool)
    tokenizer = pool.load_tokenizer()
    torch.manual_seed(cfg.seed)  # the quick demo's random model must match the one trained
    base = pool.load_model(vocab_size=len(tokenizer)).eval()
    before = score_answers(base, tokenizer, items, max_new_tokens, "before", Path(output_dir) / "answers-before")
    del base

    started = time.perf_counter()
    result = train(cfg)
    seconds = time.perf_counter() - started
    tuned = AutoModelForCausalLM.from_pretrained(result.final_checkpoint).eval()
    after = score_answers(tuned, AutoTokenizer.from_pretrained(result.final_checkpoint), items, max_new_tokens, "after", Path(output_dir) / "answers-after")
    first, last = min(result.evaluations), max(result.evaluations)
    report = DemoReport(
        "a tiny random Llama (--quick)" if quick else "SmolLM2-135M-Instruct", seconds, result.state.global_step, result.tokens_per_s,
        result.supervised_tokens_per_s, result.evaluations[first]["val/loss"], result.evaluations[last]["val/loss"],
        items[0].prompt_text(), items[0].reference, before, after, max_new_tokens,
        result.final_checkpoint, result.metrics_csv, result.loss_curve,
    )  # fmt: skip
    record = {k: v if isinstance(v, (int, float, dict)) else str(v) for k, v in asdict(report).items()}
    (Path(output_dir) / "demo.json").write_text(json.dumps(record, indent=2))
    return report
