"""``tunelab plan ...``: advice before a run. Parses flags, calls ``tunelab.planning``, prints."""

import json
from pathlib import Path

from tunelab.cli.data import _Parser
from tunelab.errors import UsageError

USAGE = """usage: tunelab plan COMMAND ...

  approach [--profile FILE] [--examples N --knowledge none|static|changing --task simple|moderate|complex
           --format --citations --latency-ms MS --requests-per-day N --budget low|medium|high]
           prompting, retrieval, fine-tuning or both, from the use case's factors, with the reasons"""


def cmd_plan(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    commands = {"approach": _approach}
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
