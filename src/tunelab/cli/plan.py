"""``tunelab plan ...``: advice before a run. Parses flags, calls ``tunelab.planning``, prints."""

import json
from pathlib import Path

from tunelab.cli.data import _Parser
from tunelab.errors import UsageError

USAGE = """usage: tunelab plan COMMAND ...

  approach [--profile FILE] [--examples N --knowledge none|static|changing --task simple|moderate|complex
           --format --citations --latency-ms MS --requests-per-day N --budget low|medium|high]
           prompting, retrieval, fine-tuning or both, from the use case's factors, with the reasons
  data     [--goal format|task] [--task simple|moderate|complex] [--base weak|fair|strong] [--data FILE [--format ...] [--modelpool P]]
           examples needed, with where the rule comes from, and what FILE already holds
  lr       --model M [--method full|lora|qlora|dpo|dpo-lora] [--batch 8] [--probe --data FILE [--probe-steps 30]]
           a learning rate from the published rates scaled to the model and batch, and optionally a range test
  compute  --model M [--method full|lora|qlora] [--batch 8] [--max-length 512] [--mean-length N] [--steps 1000]
           [--gpu h100|a100-80g|...] [--precision bf16-mixed|bf16-true|32-true] [--checkpointing] [--lora-r 16]
           memory (weights, gradients, optimizer state, activations, head) and time, and the GPUs it fits on"""


def cmd_plan(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    commands = {"approach": _approach, "data": _data, "lr": _lr, "compute": _compute}
    if argv[0] not in commands:
        raise UsageError(f"tunelab plan {argv[0]}: unknown command; see tunelab plan --help.")
    return commands[argv[0]]([a for a in argv[1:] if a != "--debug"])


def _approach(argv: list[str]) -> int:
    from tunelab.planning.approach import CHOICES, Profile, recommend

    parser = _Parser(prog="tunelab plan approach", description="Prompting, retrieval, fine-tuning or a hybrid for a use case, with the reasons.",
                     epilog="A profile file (YAML or JSON) holds the same fields; flags override it. Example: tunelab plan approach "
                            "--examples 800 --knowledge changing --format --latency-ms 300")  # fmt: skip
    parser.add_argument("--profile", help="a YAML or JSON file with the fields below")
    parser.add_argument("--examples", type=int, help="labelled input -> output examples at hand (required, here or in the profile)")
    parser.add_argument("--knowledge", choices=CHOICES["knowledge"], help="facts the answers need beyond the base's: none, static, changing")
    parser.add_argument("--citations", action="store_const", const=True, help="answers must cite their sources")
    parser.add_argument("--task", choices=CHOICES["task"], help="simple (classification, extraction), moderate, complex (multi-step reasoning)")
    parser.add_argument("--format", action="store_const", const=True, help="a strict output format, style or tone the base does not keep to")
    parser.add_argument("--latency-ms", type=int, help="the latency limit per request")
    parser.add_argument("--requests-per-day", type=int)
    parser.add_argument("--budget", choices=CHOICES["budget"], help="training compute and time: low, medium, high")
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args(argv)
    values, source = {}, "the flags"
    if args.profile:
        values, source = _read_profile(Path(args.profile)), f"profile {args.profile}"
    for name in ("examples", "knowledge", "citations", "task", "format", "latency_ms", "requests_per_day", "budget"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    recommendation = recommend(Profile.from_dict(values, source))
    print(json.dumps(recommendation.as_dict(), indent=2) if args.json else recommendation.render())
    return 0


def _data(argv: list[str]) -> int:
    from tunelab.cli.data import _data_config, _format_options, _load_tokenizer, _tokenizer_options
    from tunelab.planning.data import BASE_FACTOR, RANGES, plan_data

    parser = _Parser(prog="tunelab plan data", description="How many examples a fine-tune needs, and what a data file already holds.",
                     epilog="Example: tunelab plan data --goal format --task complex --base weak --data train.jsonl --modelpool CausalLMPool/smollm2-135m")  # fmt: skip
    parser.add_argument("--goal", default="task", choices=tuple(RANGES), help="format: teach a format or style; task: teach the task itself")
    parser.add_argument("--task", default="moderate", choices=tuple(RANGES["task"]))
    parser.add_argument("--base", default="fair", choices=tuple(BASE_FACTOR), help="how well the base already does the task")
    parser.add_argument("--data", help="a training file to measure against the range (tunelab data stats)")
    _format_options(parser)
    _tokenizer_options(parser)
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args(argv)
    if args.data and not Path(args.data).is_file():
        raise UsageError(f"--data {args.data}: no such file.")
    cfg = _data_config(args, args.data) if args.data else None
    plan = plan_data(args.goal, args.task, args.base, args.data, cfg, _load_tokenizer(args) if args.data else None)
    print(json.dumps(plan.as_dict(), indent=2, default=str) if args.json else plan.render())
    return 0


def _lr(argv: list[str]) -> int:
    from tunelab.cli.data import _data_config, _format_options
    from tunelab.planning.compute import meta_model, model_config
    from tunelab.planning.lr import PUBLISHED, range_test, rule_rate

    parser = _Parser(prog="tunelab plan lr", description="A learning rate: the published rate scaled to the model and batch, and an optional LR range test.",
                     epilog="Example: tunelab plan lr --model smollm2-135m --method lora --batch 8 --probe --data train.jsonl")  # fmt: skip
    parser.add_argument("--model", required=True, help="a shipped model pool (smollm2-135m), a model folder, or a known shape (llama2-7b, ...)")
    parser.add_argument("--method", default="full", choices=tuple(PUBLISHED))
    parser.add_argument("--batch", type=int, default=8, help="examples (pairs for DPO) per step")
    parser.add_argument("--probe", action="store_true", help="also run an LR range test on --data (a short training run)")
    parser.add_argument("--data", help="the training file for --probe")
    parser.add_argument("--probe-steps", type=int, default=30, help="steps of the range test (default 30)")
    parser.add_argument("--max-length", type=int, default=512, help="method.max_length of the range test")
    _format_options(parser)
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args(argv)
    if args.batch < 1:
        raise UsageError(f"--batch {args.batch}: give a whole number, 1 or more.")
    if args.probe and not args.data:
        raise UsageError("--probe trains a few steps: give the training file with --data.")
    if args.data and not Path(args.data).is_file():
        raise UsageError(f"--data {args.data}: no such file.")
    parameters = sum(p.numel() for p in meta_model(model_config(args.model), "full", 16).parameters())
    advice = rule_rate(args.method, parameters, args.batch)
    if args.probe:
        cfg = _data_config(args, args.data)
        fields = {k: getattr(cfg, k) for k in ("format", "prompt_field", "completion_field", "messages_field", "text_field")}
        advice.probe = range_test(args.model, args.method, args.data, args.batch, args.probe_steps, args.max_length, fields)
    print(json.dumps(advice.as_dict(), indent=2) if args.json else advice.render())
    return 0


def _compute(argv: list[str]) -> int:
    from tunelab.planning.compute import GPUS, MODEL_SHAPES, plan_compute

    parser = _Parser(prog="tunelab plan compute", description="Memory and time of a training run, before any weight is loaded.",
                     epilog=f"known shapes: {', '.join(MODEL_SHAPES)}; GPUs: {', '.join(GPUS)}. "
                            "Example: tunelab plan compute --model llama2-7b --method qlora --batch 4 --max-length 2048 --gpu a100-40g")  # fmt: skip
    parser.add_argument("--model", required=True, help="a shipped model pool (smollm2-135m), a model folder, or a known shape (llama2-7b, ...)")
    parser.add_argument("--method", default="full", choices=("full", "lora", "qlora"), help="full fine-tuning, LoRA, or LoRA on an NF4 base")
    parser.add_argument("--batch", type=int, default=8, help="examples per step")
    parser.add_argument("--max-length", type=int, default=512, help="the longest example, in tokens")
    parser.add_argument("--mean-length", type=int, help="the mean example (default: half of --max-length)")
    parser.add_argument("--supervised-share", type=float, default=0.5, help="the share of tokens the loss covers (the answers)")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--gpu", choices=tuple(GPUS), help="plan for this GPU (default: this machine, its matmul speed measured)")
    parser.add_argument("--precision", default="bf16-mixed", choices=("bf16-mixed", "bf16-true", "32-true"),
                        help="bf16-mixed: fp32 weights, bf16 compute (tunelab's default); bf16-true: bf16 weights too")
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing: keep each layer's input only, recompute the rest")
    parser.add_argument("--lora-r", type=int, default=16, help="LoRA rank (every linear layer of the decoder)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args(argv)
    for flag in ("batch", "max_length", "steps", "lora_r"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: give a whole number, 1 or more.")
    plan = plan_compute(args.model, args.method, args.batch, args.max_length, args.mean_length, args.supervised_share, args.steps, args.gpu,
                        args.precision, args.checkpointing, args.lora_r)  # fmt: skip
    print(json.dumps(plan.as_dict(), indent=2) if args.json else plan.render())
    return 0


def _read_profile(path: Path) -> dict:
    import yaml

    if not path.is_file():
        raise UsageError(f"profile {path} does not exist.")
    try:
        values = yaml.safe_load(path.read_text()) or {}  # JSON is YAML
    except yaml.YAMLError as err:
        raise UsageError(f"profile {path} is not valid YAML or JSON: {str(err).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise UsageError(f"profile {path} holds a {type(values).__name__}; give a mapping of fields (examples: 800, knowledge: changing, ...).")
    return values
