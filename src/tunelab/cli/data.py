"""``tunelab data ...``: the data toolkit's subcommands. Each parses its flags, calls one library
function in ``tunelab.data``, prints the report and writes the files it was asked for."""

import argparse
import json
from pathlib import Path

from tunelab.errors import TunelabError, UsageError

FORMATS = ("alpaca", "sharegpt", "openai", "prompt_completion", "text", "preference", "prompt")
CHAT_FORMATS = ("alpaca", "sharegpt", "openai", "prompt_completion")
DEFAULT_MODELPOOL = "CausalLMPool/smollm2-135m"


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag as tunelab's one-paragraph error instead of exiting."""

    def error(self, message):
        raise UsageError(f"{self.prog}: {message}. See {self.prog} --help.")


# ----------------------------------------------------------------------------- shared options
def _format_options(parser, required: bool = False) -> None:
    group = parser.add_argument_group("format (guessed from the fields when --format is not given)")
    group.add_argument("--format", choices=FORMATS, required=required)
    group.add_argument("--prompt-field", help="prompt_completion/prompt: the prompt's field (default prompt)")
    group.add_argument("--completion-field", help="prompt_completion: the answer's field (default completion)")
    group.add_argument("--messages-field", help="sharegpt/openai: the turns' field (default conversations/messages)")
    group.add_argument("--text-field", help="text: the field of JSON lines/Parquet/CSV records (default text)")
    group.add_argument("--system-prompt", help="a system message put before conversations that have none")


def _tokenizer_options(parser, default: str | None = None) -> None:
    group = parser.add_argument_group("tokenizer (token counts, over-length, loss masks)")
    group.add_argument("--modelpool", default=default, help=f"a shipped model pool whose tokenizer to use (e.g. {DEFAULT_MODELPOOL})")
    group.add_argument("--tokenizer", help="a tokenizer or model folder (or pkg:// path) instead of --modelpool")
    group.add_argument("--max-length", type=int, help="the method.max_length training would use")
    group.add_argument("--overlong", choices=("truncate", "drop"), default="truncate", help="data.overlong: what training does beyond it")


def _data_config(args, path: str):
    """DataConfig from the flags; the format and its fields guessed from the file when not given."""
    from tunelab.config import DataConfig
    from tunelab.data.files import guess_format, scan_file

    options = {
        key: value for key, value in {
            "prompt_field": args.prompt_field, "completion_field": args.completion_field, "messages_field": args.messages_field,
            "text_field": args.text_field, "system_prompt": args.system_prompt,
        }.items() if value is not None
    }  # fmt: skip
    fmt = args.format
    if fmt is None:
        fmt, guessed = guess_format(scan_file(path, options.get("text_field", "text")))
        options = {**guessed, **options}
    overlong = getattr(args, "overlong", None) or "truncate"
    return DataConfig(path=path, format=fmt, overlong=overlong, **options)


def _load_tokenizer(args):
    if getattr(args, "tokenizer", None):
        from tunelab.models import CausalLMPool

        return CausalLMPool(model_path=args.tokenizer).load_tokenizer()
    if not getattr(args, "modelpool", None):
        return None
    from hydra.utils import instantiate

    from tunelab.config import compose_config

    return instantiate(compose_config([f"modelpool={args.modelpool}"]).modelpool).load_tokenizer()


def _emit(report, as_json: bool, limit: int | None = None) -> None:
    if as_json:
        print(json.dumps(report.to_dict(), indent=2, ensure_ascii=False))
    else:
        print(report.render(limit) if limit is not None else report.render())


def _written(what: str, path) -> None:
    print(f"{what}: {path}")


# ----------------------------------------------------------------------------- subcommands
def cmd_stats(argv: list[str]) -> int:
    from tunelab.data.stats import dataset_stats, save_histogram

    parser = _Parser(prog="tunelab data stats", description="Counts, token lengths, supervised-token share, longest examples, turns.")
    parser.add_argument("file")
    _format_options(parser)
    _tokenizer_options(parser)
    parser.add_argument("--png", help="write the token-length histogram here (PNG)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    cfg = _data_config(args, args.file)
    report = dataset_stats(args.file, cfg, tokenizer=_load_tokenizer(args), max_length=args.max_length)
    _emit(report, args.json)
    if args.png:
        _written("histogram", save_histogram(report, args.png))
    return 0


def cmd_validate(argv: list[str]) -> int:
    from tunelab.data.validate import fix_file, validate_file

    parser = _Parser(prog="tunelab data validate", description="Check a data file; exit 1 when it has errors. --fix OUT writes a repaired copy.")
    parser.add_argument("file")
    _format_options(parser)
    _tokenizer_options(parser)
    parser.add_argument("--fix", metavar="OUT", help="write a repaired copy here (the input is never edited)")
    parser.add_argument("--limit", type=int, default=50, help="findings shown (default 50; --json shows all)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    cfg = _data_config(args, args.file)
    report = validate_file(args.file, cfg, tokenizer=_load_tokenizer(args), max_length=args.max_length)
    _emit(report, args.json, None if args.json else args.limit)
    if args.fix:
        fixed = fix_file(args.file, cfg, args.fix)
        if not args.json:
            print(fixed.render())
        _written("repaired copy", args.fix)
    return 0 if report.ok else 1


def cmd_audit(argv: list[str]) -> int:
    from tunelab.data.audit import audit_file

    parser = _Parser(prog="tunelab data audit", description="Show examples with the supervised tokens highlighted; check loss masks and templates.")
    parser.add_argument("file")
    _format_options(parser)
    _tokenizer_options(parser, default=DEFAULT_MODELPOOL)
    parser.add_argument("-n", type=int, default=5, help="examples to show (default 5)")
    parser.add_argument("--lines", help="show these lines of the file instead (comma-separated)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--html", help="also write the page here (HTML)")
    parser.add_argument("--no-color", action="store_true", help="mark supervised text with ⟦ ⟧ instead of colours")
    parser.add_argument("--json", action="store_true", help="print the checks as JSON")
    args = parser.parse_args(argv)
    cfg = _data_config(args, args.file)
    lines = [int(x) for x in args.lines.split(",")] if args.lines else None
    report = audit_file(args.file, cfg, _load_tokenizer(args), n=args.n, seed=args.seed, lines=lines, max_length=args.max_length)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, ensure_ascii=False))
    else:
        print(report.render_terminal(color=not args.no_color))
    if args.html:
        Path(args.html).parent.mkdir(parents=True, exist_ok=True)
        Path(args.html).write_text(report.render_html(), encoding="utf-8")
        _written("audit page", args.html)
    return 0 if report.ok else 1


def _pii_kinds(value: str | None):
    from tunelab.data.pii import PII_KINDS

    if value is None or value == "all":
        return PII_KINDS
    if value == "none":
        return None
    kinds = tuple(k.strip() for k in value.split(",") if k.strip())
    unknown = [k for k in kinds if k not in PII_KINDS]
    if unknown:
        raise UsageError(f"--pii: unknown kind(s) {', '.join(unknown)}; choose from {', '.join(PII_KINDS)}, all or none.")
    return kinds


def cmd_clean(argv: list[str]) -> int:
    from tunelab.data.clean import clean_file

    parser = _Parser(prog="tunelab data clean", description="Normalise, deduplicate, redact PII and filter; writes a cleaned copy.")
    parser.add_argument("file")
    parser.add_argument("-o", "--output", required=True, help="the cleaned file (never the input)")
    parser.add_argument("--no-normalize", action="store_true", help="keep whitespace, control characters and unicode forms as they are")
    parser.add_argument("--no-dedup", action="store_true", help="keep exact duplicates")
    parser.add_argument("--no-near-dedup", action="store_true", help="keep near duplicates")
    parser.add_argument("--near-threshold", type=float, default=0.8, help="estimated Jaccard similarity of near duplicates (default 0.8)")
    parser.add_argument("--pii", default="all", help="kinds to redact, comma-separated, or all (default) or none")
    parser.add_argument("--min-chars", type=int)
    parser.add_argument("--max-chars", type=int)
    parser.add_argument("--max-repetition", type=float, help="drop records whose share of repeated word n-grams is above this")
    parser.add_argument("--language", help="keep only this language (needs langdetect or fasttext installed)")
    parser.add_argument("--report", help="write the full report here (JSON)")
    parser.add_argument("--limit", type=int, default=50, help="findings shown (default 50)")
    args = parser.parse_args(argv)
    report = clean_file(
        args.file, args.output, normalize=not args.no_normalize, exact_dedup=not args.no_dedup, near_dedup=not args.no_near_dedup,
        near_threshold=args.near_threshold, pii=_pii_kinds(args.pii), min_chars=args.min_chars, max_chars=args.max_chars,
        max_repetition=args.max_repetition, language=args.language,
    )  # fmt: skip
    print(report.render(args.limit))
    _written("cleaned copy", args.output)
    if args.report:
        Path(args.report).write_text(json.dumps(report.to_dict(), indent=2, ensure_ascii=False), encoding="utf-8")
        _written("report", args.report)
    return 0


def cmd_contamination(argv: list[str]) -> int:
    from tunelab.data.contamination import find_contamination, remove_contaminated

    parser = _Parser(prog="tunelab data contamination", description="Training examples that overlap evaluation sets (n-grams, near duplicates).")
    parser.add_argument("train")
    parser.add_argument("eval", nargs="+", help="one or more evaluation files")
    parser.add_argument("-n", "--ngram", type=int, default=13, help="word n-gram length (default 13)")
    parser.add_argument("--near-threshold", type=float, default=0.8)
    parser.add_argument("--remove", metavar="OUT", help="write the training set without the contaminated examples")
    parser.add_argument("--limit", type=int, default=50)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    report = find_contamination(args.train, args.eval, n=args.ngram, near_threshold=args.near_threshold)
    _emit(report, args.json, None if args.json else args.limit)
    if args.remove:
        remove_contaminated(report, args.remove)
        _written("decontaminated copy", args.remove)
    return 0


def _ratios(value: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in value.split(","))
    except ValueError:
        raise UsageError(f"--ratios {value!r}: give comma-separated fractions such as 0.8,0.1,0.1.") from None


def cmd_split(argv: list[str]) -> int:
    from tunelab.data.transform import split_file

    parser = _Parser(prog="tunelab data split", description="Deterministic (optionally stratified) train/validation/test split.")
    parser.add_argument("file")
    parser.add_argument("--ratios", default="0.8,0.1,0.1", help="fractions, comma-separated (default 0.8,0.1,0.1)")
    parser.add_argument("--names", default=None, help="split names, comma-separated (default train,validation,test)")
    parser.add_argument("--stratify", metavar="FIELD", help="keep this field's proportions in every split")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-o", "--output-dir", default=None, help="folder for the splits (default: beside the file)")
    args = parser.parse_args(argv)
    report = split_file(args.file, ratios=_ratios(args.ratios), names=args.names.split(",") if args.names else None,
                        stratify=args.stratify, seed=args.seed, out_dir=args.output_dir)  # fmt: skip
    print(report.render())
    return 0


def cmd_convert(argv: list[str]) -> int:
    from tunelab.data.transform import convert_file

    parser = _Parser(prog="tunelab data convert", description="Convert between alpaca, sharegpt, openai and prompt_completion.")
    parser.add_argument("file")
    parser.add_argument("--from", dest="source", choices=CHAT_FORMATS, help="the file's format (guessed when not given)")
    parser.add_argument("--to", dest="target", choices=CHAT_FORMATS, required=True)
    parser.add_argument("-o", "--output", required=True)
    parser.add_argument("--prompt-field", default="prompt")
    parser.add_argument("--completion-field", default="completion")
    args = parser.parse_args(argv)
    source = args.source
    if source is None:
        from tunelab.data.files import guess_format, scan_file

        source, _ = guess_format(scan_file(args.file))
    report = convert_file(args.file, args.output, source, args.target, prompt_field=args.prompt_field, completion_field=args.completion_field)
    print(report.render())
    _written("converted", args.output)
    return 0


def _source(value: str) -> tuple[str, float]:
    path, _, weight = value.partition(":") if value.count(":") == 1 and not Path(value).exists() else (value, "", "")
    try:
        return path, float(weight) if weight else 1.0
    except ValueError:
        raise TunelabError(f"Source {value!r}: give FILE or FILE:WEIGHT with a number as the weight.") from None


def cmd_mix(argv: list[str]) -> int:
    from tunelab.data.transform import mix_files

    parser = _Parser(prog="tunelab data mix", description="Mix files into one (proportional, equal or temperature shares, as training mixtures).")
    parser.add_argument("sources", nargs="+", metavar="FILE[:WEIGHT]")
    parser.add_argument("-o", "--output", required=True)
    parser.add_argument("--mixing", choices=("proportional", "equal", "temperature"), default="proportional")
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--size", type=int, help="records in the mix (default: every source's records once)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    report = mix_files([_source(s) for s in args.sources], args.output, mixing=args.mixing, temperature=args.temperature,
                       size=args.size, seed=args.seed)  # fmt: skip
    print(report.render())
    _written("mix", args.output)
    return 0


def _client_options(parser) -> None:
    group = parser.add_argument_group("generator (the local model by default, or an OpenAI-compatible endpoint)")
    group.add_argument("--endpoint", help="base URL of an OpenAI-compatible API, e.g. http://127.0.0.1:8000/v1")
    group.add_argument("--model", help="the endpoint's model name, or a local model folder/GGUF (default: --modelpool's model)")
    group.add_argument("--api-key", help="the endpoint's key (default $OPENAI_API_KEY, or none)")
    group.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the endpoint (default 60)")
    group.add_argument("--modelpool", default=DEFAULT_MODELPOOL, help=f"local model pool (default {DEFAULT_MODELPOOL})")
    group.add_argument("--temperature", type=float, default=0.8)
    group.add_argument("--seed", type=int, default=0)


def _client(args):
    from tunelab.data.synth import EndpointClient, LocalModelClient

    if args.endpoint:
        return EndpointClient(args.endpoint, model=args.model or "default", api_key=args.api_key, timeout=args.timeout)
    if args.model:
        from tunelab.models import CausalLMPool

        return LocalModelClient(CausalLMPool(model_path=args.model), seed=args.seed)
    from hydra.utils import instantiate

    from tunelab.config import compose_config

    return LocalModelClient(instantiate(compose_config([f"modelpool={args.modelpool}"]).modelpool), seed=args.seed)


def cmd_synth(argv: list[str]) -> int:
    from tunelab.data.synth import synthesize

    parser = _Parser(prog="tunelab data synth", description="Generate new instruction data from seed examples (Self-Instruct).")
    parser.add_argument("seeds", help="seed examples (alpaca, or any chat format with --format)")
    parser.add_argument("-o", "--output", required=True)
    parser.add_argument("-n", type=int, required=True, help="new examples to write")
    parser.add_argument("--format", choices=CHAT_FORMATS, default="alpaca")
    _client_options(parser)
    args = parser.parse_args(argv)
    report = synthesize(args.seeds, args.output, args.n, _client(args), seed_format=args.format, temperature=args.temperature, seed=args.seed)
    print(report.render())
    _written("generated", args.output)
    return 0


def cmd_augment(argv: list[str]) -> int:
    from tunelab.data.synth import augment

    parser = _Parser(prog="tunelab data augment", description="Paraphrase each example's instruction, keeping its answer.")
    parser.add_argument("file")
    parser.add_argument("-o", "--output", required=True)
    parser.add_argument("--per-example", type=int, default=1)
    parser.add_argument("--format", choices=CHAT_FORMATS, default="alpaca")
    _client_options(parser)
    args = parser.parse_args(argv)
    report = augment(args.file, args.output, _client(args), format=args.format, n_per_example=args.per_example, temperature=args.temperature)
    print(report.render())
    _written("augmented", args.output)
    return 0


SUBCOMMANDS = {
    "stats": (cmd_stats, "counts, token-length histogram, supervised-token share, longest examples"),
    "validate": (cmd_validate, "schema, empty fields, over-length, roles, encoding; --fix OUT"),
    "audit": (cmd_audit, "examples with supervised tokens highlighted; loss-mask and template checks"),
    "clean": (cmd_clean, "normalise, deduplicate (exact and near), redact PII, filter"),
    "contamination": (cmd_contamination, "overlap of training examples with evaluation sets; --remove OUT"),
    "split": (cmd_split, "train/validation/test split, deterministic, optionally stratified"),
    "convert": (cmd_convert, "alpaca <-> sharegpt <-> openai <-> prompt_completion"),
    "mix": (cmd_mix, "mix files: proportional, equal or temperature shares"),
    "synth": (cmd_synth, "generate instruction data from seeds with an LLM"),
    "augment": (cmd_augment, "paraphrase instructions with an LLM"),
}


def usage() -> str:
    lines = ["usage: tunelab data COMMAND ...", ""] + [f"  {name:<14}{about}" for name, (_, about) in SUBCOMMANDS.items()]
    return "\n".join(lines + ["", "tunelab data COMMAND --help shows a command's options."])


def cmd_data(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] not in SUBCOMMANDS:
        raise UsageError(f"Unknown data command '{argv[0]}'. Choose from: {', '.join(SUBCOMMANDS)} (tunelab data --help).")
    try:
        return SUBCOMMANDS[argv[0]][0]([a for a in argv[1:] if a != "--debug"])  # main() handles --debug
    except SystemExit as done:  # argparse's --help
        return int(done.code or 0)
