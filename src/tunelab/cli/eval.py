"""``tunelab eval ...``: evaluation subcommands. Each parses its flags, calls the library in
``tunelab.evaluation``, prints the report and writes the files it was asked for."""

import json
from pathlib import Path

from tunelab.cli.data import FORMATS, _Parser
from tunelab.errors import UsageError

USAGE = """usage: tunelab eval COMMAND ...

  perplexity   perplexity of a model on a text or chat data set
  generate     generate answers for a data set and score them (gsm8k, exact_match, rouge, bleu, chrf, ...)
  compare      a base and a tuned model on the same sets: metrics, perplexity, forgetting, HTML report
  human-sheet  blind rating sheets (CSV and HTML) from several models' predictions
  agreement    Krippendorff's alpha of filled rating sheets, and the unblinded result per model
  ab           A/B statistics: two-proportion, Welch and Mann-Whitney tests, sample size
  lm-eval      run lm-evaluation-harness tasks (local task files) on a model

Models (--model): a Hugging Face model folder, a .gguf file, a tunelab run folder or checkpoint,
a shipped model pool name (smollm2-135m, tiny-llama), or an OpenAI-compatible endpoint
(http://host:port/v1, with #MODEL to pick a served model). --adapter adds a peft adapter folder.
Run tunelab eval COMMAND --help for a command's options."""


def _model_options(parser, prefix: str = "", required: bool = True) -> None:
    group = parser.add_argument_group("model")
    flag = f"--{prefix}model" if prefix else "--model"
    group.add_argument(flag, required=required, help="model folder, .gguf, run folder, shipped pool name or http(s):// endpoint")
    group.add_argument(f"--{prefix}adapter" if prefix else "--adapter", help="a peft (or tunelab bottleneck) adapter folder to put on the model")
    if not prefix:
        group.add_argument("--tokenizer", help="tokenizer folder (default: the model's; endpoints: for chat templates)")
        group.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
        group.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when there is one)")
        group.add_argument("--api-key", help="endpoint API key (default $OPENAI_API_KEY)")


def _data_options(parser, flag: str = "--data", required: bool = True) -> None:
    group = parser.add_argument_group("data (format guessed from the fields when --format is not given)")
    group.add_argument(flag, required=required, help="a data file: JSON lines, JSON, Parquet, CSV or text")
    group.add_argument("--format", choices=FORMATS)
    group.add_argument("--prompt-field")
    group.add_argument("--completion-field")
    group.add_argument("--messages-field")
    group.add_argument("--text-field")
    group.add_argument("--system-prompt")
    group.add_argument("--reference-field", help="format=prompt: the field holding the reference answer (default: answer, completion, ...)")
    group.add_argument("--start", type=int, default=0, help="first row to evaluate (0-based)")
    group.add_argument("--limit", type=int, help="evaluate at most N rows")


def _generation_options(parser) -> None:
    group = parser.add_argument_group("generation")
    group.add_argument("--max-new-tokens", type=int, default=256)
    group.add_argument("--batch-size", type=int, default=16)
    group.add_argument("--sample", action="store_true", help="sample (default: greedy)")
    group.add_argument("--temperature", type=float, default=1.0)
    group.add_argument("--top-p", type=float, default=1.0)
    group.add_argument("--top-k", type=int, default=0)
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--stop-loops", action="store_true",
                       help="end an answer that cycles through one phrase (local models), cut after its first copy and counted as looped")


def _items(args, flag: str = "data"):
    from tunelab.evaluation.items import load_items

    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit {args.limit} must be at least 1.")
    return load_items(
        getattr(args, flag), args.format, limit=args.limit, start=args.start, reference_field=args.reference_field,
        prompt_field=args.prompt_field, completion_field=args.completion_field, messages_field=args.messages_field,
        text_field=args.text_field, system_prompt=args.system_prompt,
    )  # fmt: skip


def _metrics_and_settings(args):
    """The metrics (default exact_match) and generation settings, checked before any model loads."""
    from tunelab.evaluation.generate import GenerationSettings
    from tunelab.evaluation.metrics import resolve_metric

    metrics = args.metric or ["exact_match"]
    for spec in metrics:
        resolve_metric(spec)
    settings = GenerationSettings(args.max_new_tokens, not args.sample, args.temperature, args.top_p, args.top_k, args.batch_size, args.seed,
                                  getattr(args, "stop_loops", False))  # fmt: skip
    settings.check()
    endpoints = [getattr(args, flag) for flag in ("model", "base", "tuned") if str(getattr(args, flag, "") or "").startswith(("http://", "https://"))]
    if settings.stop_loops and endpoints:
        raise UsageError(f"--stop-loops needs a model in this process; {endpoints[0]} generates on its own side (drop --stop-loops).")
    return metrics, settings


def _load(args, prefix: str = ""):
    from tunelab.evaluation.models import load_eval_model

    return load_eval_model(
        getattr(args, f"{prefix}model"), getattr(args, f"{prefix}adapter"), getattr(args, "tokenizer", None),
        getattr(args, "dtype", "float32"), getattr(args, "device", None), getattr(args, "api_key", None),
    )  # fmt: skip


def _emit(report, as_json: bool) -> None:
    print(json.dumps(report.to_dict(), indent=2, ensure_ascii=False) if as_json else report.render())


def cmd_perplexity(argv: list[str]) -> int:
    parser = _Parser(prog="tunelab eval perplexity", description="Perplexity on the supervised tokens of chat records, or every token of texts (rolling windows).")
    _model_options(parser)
    _data_options(parser)
    parser.add_argument("--max-length", type=int, help="window length in tokens (default: the model's, at most 2048)")
    parser.add_argument("--stride", type=int, help="tokens a window moves (default: half the window)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("-o", "--output", help="write the report (with per-item NLL) as JSON here")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    from tunelab.evaluation.perplexity import perplexity

    items = _items(args)
    model = _load(args)
    report = perplexity(model, items, args.data, args.max_length, args.stride, args.batch_size)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(report.to_dict(), indent=2))
    _emit(report, args.json)
    return 0


def cmd_generate(argv: list[str]) -> int:
    from tunelab.evaluation.metrics import METRICS

    parser = _Parser(prog="tunelab eval generate", description="Generate answers (batched, KV cache) and score them; predictions are written beside the scores.")
    _model_options(parser)
    _data_options(parser)
    _generation_options(parser)
    parser.add_argument("--metric", action="append", help=f"repeatable: {', '.join(METRICS)}, or a dotted path to f(predictions, references, **columns)")
    parser.add_argument("-o", "--output-dir", help="write predictions.jsonl and scores.json here")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    from tunelab.evaluation.generate import evaluate_generation
    from tunelab.progress import progress_bar

    metrics, settings = _metrics_and_settings(args)
    items = _items(args)
    model = _load(args)
    with progress_bar(len(items), desc="Generating") as bar:
        report = evaluate_generation(model, items, metrics, settings, args.data, args.output_dir, progress=bar)
    _emit(report, args.json)
    return 0


def cmd_compare(argv: list[str]) -> int:
    from tunelab.evaluation.compare import DEFAULT_GENERAL

    parser = _Parser(prog="tunelab eval compare", description="A base and a tuned model on the same sets, with paired bootstrap intervals and an HTML report.")
    group = parser.add_argument_group("models")
    group.add_argument("--base", required=True, help="the base model (as --model of tunelab eval generate)")
    group.add_argument("--base-adapter")
    group.add_argument("--tuned", required=True, help="the fine-tuned model: a run folder, a checkpoint, a model folder, ...")
    group.add_argument("--tuned-adapter")
    group.add_argument("--tokenizer", help="tokenizer folder for both (default: each model's own)")
    group.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    group.add_argument("--device")
    group.add_argument("--api-key")
    group.add_argument("--base-predictions", help="reuse the predictions.jsonl (or its folder) of an earlier `tunelab eval generate` of the base on these items")
    group.add_argument("--tuned-predictions", help="the same for the tuned model")
    _data_options(parser)
    parser.add_argument("--general", action="append", help=f"a general set to measure forgetting on (repeatable; default {DEFAULT_GENERAL}; 'none' for none)")
    parser.add_argument("--general-limit", type=int, default=200, help="items of each general set (default 200)")
    _generation_options(parser)
    parser.add_argument("--metric", action="append", help="repeatable (as tunelab eval generate); default exact_match")
    parser.add_argument("--samples", type=int, default=12, help="items shown side by side in the report")
    parser.add_argument("-o", "--output-dir", required=True, help="folder for report.html, report.json, charts and predictions")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    from tunelab.evaluation.compare import compare_models
    from tunelab.evaluation.items import load_items
    from tunelab.evaluation.models import load_eval_model
    from tunelab.progress import progress_bar

    metrics, settings = _metrics_and_settings(args)
    items = _items(args)
    general_sets = [g for g in (args.general or [DEFAULT_GENERAL]) if g.lower() != "none"]
    general = {g: load_items(g, limit=args.general_limit) for g in general_sets}

    def loader(model: str, adapter: str | None):
        return lambda: load_eval_model(model, adapter, args.tokenizer, args.dtype, args.device, args.api_key)

    reuse = (args.base_predictions, args.tuned_predictions)
    with progress_bar(len(items) * sum(r is None for r in reuse), desc="Generating") as bar:
        report = compare_models(
            loader(args.base, args.base_adapter), loader(args.tuned, args.tuned_adapter), items, metrics, settings, general,
            args.data, args.output_dir, reuse, args.samples, progress=bar,
        )  # fmt: skip
    _emit(report, args.json)
    return 0


def _stats(name: str):
    def run(argv: list[str]) -> int:
        from tunelab.cli import eval_stats

        return getattr(eval_stats, name)(argv)

    return run


def cmd_lm_eval(argv: list[str]) -> int:
    from tunelab.cli.eval_lm_eval import cmd_lm_eval as run

    return run(argv)


COMMANDS = {
    "perplexity": cmd_perplexity, "generate": cmd_generate, "compare": cmd_compare,
    "human-sheet": _stats("cmd_human_sheet"), "agreement": _stats("cmd_agreement"), "ab": _stats("cmd_ab"), "lm-eval": cmd_lm_eval,
}  # fmt: skip


def cmd_eval(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if argv[0] not in COMMANDS:
        raise UsageError(f"Unknown command 'tunelab eval {argv[0]}'. Commands: {', '.join(COMMANDS)}.")
    return COMMANDS[argv[0]]([a for a in argv[1:] if a != "--debug"])
