"""``tunelab export ...``: merged transformers folders and GGUF files, each verified against the
model it came from. Parses flags, calls ``tunelab.deploy.export``, prints the report."""

import json

from tunelab.cli.data import _Parser
from tunelab.errors import UsageError

USAGE = """usage: tunelab export COMMAND SOURCE -o OUT [options]

  merge   fold an adapter into its base: a plain transformers folder (safetensors, tokenizer,
          chat template, generation config)
  gguf    a Llama-family model as one GGUF file for llama.cpp, Ollama or LM Studio (--type f16,
          bf16, q8_0, ...), or with --adapter a LoRA adapter as a llama.cpp adapter file

SOURCE: a tunelab run folder or checkpoint, an adapter folder of a tunelab run, a model folder,
or a peft adapter folder with --base MODEL. Every export is verified against SOURCE on a fixed set
of texts (--no-verify to skip): largest logit difference, perplexity of both, greedy agreement;
beyond the tolerance of its number format it fails (exit 1) and is kept at OUT.unverified.
Run tunelab export COMMAND --help for a command's options."""


def _common(parser) -> None:
    parser.add_argument("source", help="run folder, checkpoint, adapter folder or model folder")
    parser.add_argument("-o", "--output", required=True, help="where the export goes (refused if it exists, unless --overwrite)")
    parser.add_argument("--base", help="the base model of a peft adapter folder that is not from a tunelab run")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    group = parser.add_argument_group("verification")
    group.add_argument("--no-verify", action="store_true", help="skip verification")
    group.add_argument("--verify-data", help="texts to verify on: any data file tunelab eval reads (default: shipped GSM8K conversations)")
    group.add_argument("--verify-start", type=int, help="first row of --verify-data (0-based)")
    group.add_argument("--verify-limit", type=int, help="at most N rows of --verify-data")
    parser.add_argument("--json", help="also write the export's report here")
    parser.add_argument("--debug", action="store_true", help=__import__("argparse").SUPPRESS)


def _verify_options(args) -> dict:
    return {"verify": not args.no_verify, "verify_data": args.verify_data, "verify_start": args.verify_start, "verify_limit": args.verify_limit}


def _report(result, json_path: str | None) -> int:
    print(f"{result.kind} export of {result.source} -> {result.path}")
    v = result.verification
    if v is not None:
        print(_verification_line("verification" if result.kind != "gguf" else "transformers' GGUF loader", v))
    for name, check in result.checks.items():
        if name == "written":
            print(f"  written: {json.dumps(check)}")
        elif name == "base":
            print(f"  base: {check['quantization']}, dequantized before merging; judged at {check['judged_as']} precision")
        elif "skipped" in check:
            print(f"  {name}: not checked ({check['skipped']})")
        else:
            if "max_logit_difference" in check:
                print(_verification_line("llama.cpp", check) + (f"; tokenizer identical on {check['tokenizer_identical']} texts" if "tokenizer_identical" in check else ""))
            if check.get("chat"):
                print(f"  llama.cpp's answer through the chat template to {check['chat']['question'][:70]!r}...:\n    {check['chat']['answer'][:300]!r}")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result.as_dict(), f, indent=2)
    if not result.passed:
        print(f"error: the export failed verification; it is kept at {result.path} for inspection, not at the output path.")
        return 1
    return 0


def _verification_line(label: str, v: dict) -> str:
    bound = v["tolerance"]["max_logit_difference"]
    return (
        f"  {label}: {'passed' if v['passed'] else 'FAILED'} on {v['texts']} texts ({v['scored_tokens']} scored tokens): "
        f"largest logit difference {v['max_logit_difference']:.3g}{f' (tolerance {bound:g})' if bound is not None else ''}, "
        f"top-1 agreement {v['top1_agreement']:.2%}, perplexity {v['perplexity_source']:.4f} -> {v['perplexity_export']:.4f} "
        f"(ratio {v['perplexity_ratio']:.5f}, tolerance ±{v['tolerance']['perplexity_ratio']:g}), "
        f"greedy continuations identical {v['greedy_identical']}/{v['greedy_prompts']}"
    )


def cmd_merge(argv: list[str]) -> int:
    parser = _Parser(prog="tunelab export merge", description="Merge an adapter into its base and save a verified transformers folder.")
    _common(parser)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"), help="the saved weights' type (default float32)")
    args = parser.parse_args(argv)
    from tunelab.deploy.export import export_merged

    result = export_merged(args.source, args.output, base=args.base, dtype=args.dtype, overwrite=args.overwrite, **_verify_options(args))
    return _report(result, args.json)


def cmd_gguf(argv: list[str]) -> int:
    from tunelab.deploy.gguf import NUMBER_FORMATS

    parser = _Parser(prog="tunelab export gguf", description="Write a Llama-family model, or a LoRA adapter, as GGUF, verified.")
    _common(parser)
    parser.add_argument("--type", default=None, choices=NUMBER_FORMATS, help="number format (models: default f16; adapters: default f32)")
    parser.add_argument("--adapter", action="store_true", help="write SOURCE's LoRA adapter as a llama.cpp adapter file (llama-cli --lora OUT)")
    parser.add_argument("--base-gguf", help="--adapter: the base's GGUF to verify on (default: the base written as f32 for the check)")
    llama = parser.add_mutually_exclusive_group()
    llama.add_argument("--llama-cpp", action="store_true", default=None, help="require verification with llama.cpp (pip install xllamacpp)")
    llama.add_argument("--no-llama-cpp", dest="llama_cpp", action="store_false", help="verify with transformers' GGUF loader only")
    args = parser.parse_args(argv)
    from tunelab.deploy.export import export_adapter_gguf, export_gguf

    if args.adapter:
        if args.llama_cpp is False:
            raise UsageError("--adapter files are verified with llama.cpp only (transformers cannot apply a GGUF adapter); drop --no-llama-cpp or use --no-verify.")
        result = export_adapter_gguf(args.source, args.output, base=args.base, number_format=args.type or "f32", base_gguf=args.base_gguf,
                                     overwrite=args.overwrite, **_verify_options(args))  # fmt: skip
    else:
        if args.base_gguf:
            raise UsageError("--base-gguf goes with --adapter (the base an adapter file is verified on).")
        result = export_gguf(args.source, args.output, number_format=args.type or "f16", base=args.base, llama_cpp=args.llama_cpp,
                             overwrite=args.overwrite, **_verify_options(args))  # fmt: skip
    return _report(result, args.json)


COMMANDS = {"merge": cmd_merge, "gguf": cmd_gguf}


def cmd_export(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if argv[0] not in COMMANDS:
        raise UsageError(f"Unknown command 'tunelab export {argv[0]}'. Commands: {', '.join(COMMANDS)}.")
    return COMMANDS[argv[0]]([a for a in argv[1:] if a != "--debug"])
