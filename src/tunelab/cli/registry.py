"""``tunelab registry ...``: versions of trained models with their lineage, and which one is in
production. Parses flags, calls ``tunelab.deploy.registry``, prints the result."""

import json

from tunelab.cli.data import _Parser
from tunelab.errors import UsageError

USAGE = """usage: tunelab registry COMMAND [--registry-url URL] ...

  register NAME PATH [--parent V]   PATH (a run folder, checkpoint, adapter or model folder) as the
                                    next version of NAME, with its base model and content hash, data
                                    files and their hashes, resolved config and metrics
  list [NAME]                       versions and their stages
  show REF                          one version in full (REF: NAME@3, NAME@production, NAME@latest)
  promote NAME VERSION [--stage production|staging]
  rollback NAME                     production goes back to the version before the current one
  diff NAME V1 V2                   config, data, metrics and lineage that differ
  history NAME                      every promotion and rollback
  delete NAME VERSION               (refused for the production version)

The registry is a database: --registry-url (or $TUNELAB_REGISTRY_URL), by default the SQLite file
runs/registry.db; postgresql+psycopg://USER@HOST/DB for a team (pip install 'tunelab[postgres]')."""


def _parser(prog: str, description: str) -> _Parser:
    parser = _Parser(prog=f"tunelab registry {prog}", description=description)
    parser.add_argument("--registry-url", help="the registry database (default $TUNELAB_REGISTRY_URL or sqlite:///runs/registry.db)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    return parser


def _registry(args):
    from tunelab.deploy.registry import Registry

    return Registry(args.registry_url)


def _line(v) -> str:
    metric = next((f"{k}={v.metrics[k]:.4g}" for k in ("val/loss", "val/rewards/accuracy", "val/reward", "val/gsm8k") if isinstance(v.metrics.get(k), (int, float))), "")
    return f"{v.ref:<28} {v.stage:<10} {v.kind:<10} {v.created_at}  {metric:<18} {v.path}"


def _emit(args, value, text: str) -> None:
    print(json.dumps(value, indent=2, default=str) if args.json else text)


def cmd_register(argv: list[str]) -> int:
    parser = _parser("register", "Register a trained folder as the next version of a name.")
    parser.add_argument("name")
    parser.add_argument("path", help="a run folder, a checkpoint, an adapter folder or a model folder")
    parser.add_argument("--parent", type=int, help="the version this one was trained from or replaces")
    parser.add_argument("--by", help="who registers it (default: the user name)")
    args = parser.parse_args(argv)
    v = _registry(args).register(args.name, args.path, parent=args.parent, by=args.by)
    _emit(args, v.to_dict(), f"registered {v.ref} ({v.kind}, base {v.base_model or 'unknown'}, {len(v.data)} data file(s)): {v.path}")
    return 0


def cmd_list(argv: list[str]) -> int:
    parser = _parser("list", "Versions and their stages.")
    parser.add_argument("name", nargs="?")
    args = parser.parse_args(argv)
    versions = _registry(args).list_versions(args.name)
    _emit(args, [v.to_dict() for v in versions], "\n".join(_line(v) for v in versions) or "the registry is empty")
    return 0


def cmd_show(argv: list[str]) -> int:
    parser = _parser("show", "One version in full, with its lineage.")
    parser.add_argument("ref", help="NAME@VERSION, NAME@production, NAME@staging, NAME@latest")
    args = parser.parse_args(argv)
    v = _registry(args).resolve(args.ref)
    text = "\n".join([
        f"{v.ref}  stage {v.stage}  ({v.kind})", f"  path:       {v.path}", f"  base model: {v.base_model} (sha256 {v.base_hash})",
        f"  weights:    sha256 {v.artifact_hash}", f"  parent:     {v.parent_version}", f"  registered: {v.created_at} by {v.created_by}",
        "  data:", *[f"    {path}  sha256 {digest}" for path, digest in v.data.items()],
        "  metrics:", *[f"    {k}: {value}" for k, value in v.metrics.items()],
    ])  # fmt: skip
    _emit(args, v.to_dict(), text)
    return 0


def cmd_promote(argv: list[str]) -> int:
    parser = _parser("promote", "Make a version the production (or staging) version of its name.")
    parser.add_argument("name")
    parser.add_argument("version", type=int)
    parser.add_argument("--stage", default="production", choices=("production", "staging"))
    parser.add_argument("--by")
    args = parser.parse_args(argv)
    v = _registry(args).promote(args.name, args.version, args.stage, by=args.by)
    _emit(args, v.to_dict(), f"{v.ref} is now {args.stage}")
    return 0


def cmd_rollback(argv: list[str]) -> int:
    parser = _parser("rollback", "Production goes back to the version that held it before the current one was promoted.")
    parser.add_argument("name")
    parser.add_argument("--by")
    args = parser.parse_args(argv)
    v = _registry(args).rollback(args.name, by=args.by)
    _emit(args, v.to_dict(), f"rolled back: {v.ref} is production again")
    return 0


def cmd_diff(argv: list[str]) -> int:
    parser = _parser("diff", "What differs between two versions of a name.")
    parser.add_argument("name")
    parser.add_argument("first", type=int)
    parser.add_argument("second", type=int)
    args = parser.parse_args(argv)
    diff = _registry(args).diff(args.name, args.first, args.second)
    lines = [f"{args.name}@{args.first} -> {args.name}@{args.second}"]
    for section, changes in diff.items():
        lines.append(f"  {section}:" + ("" if changes else " the same"))
        lines += [f"    {key}: {a!r} -> {b!r}" for key, (a, b) in changes.items()]
    _emit(args, diff, "\n".join(lines))
    return 0


def cmd_history(argv: list[str]) -> int:
    parser = _parser("history", "Every promotion and rollback of a name.")
    parser.add_argument("name")
    args = parser.parse_args(argv)
    events = _registry(args).history(args.name)
    lines = [f"{e['at']}  {e['action']:<8} {args.name}@{e['version']} -> {e['stage']}" + (f" (was {args.name}@{e['previous']})" if e["previous"] else "") + f"  by {e['by']}"
             for e in events]  # fmt: skip
    _emit(args, events, "\n".join(lines) or "no promotions yet")
    return 0


def cmd_delete(argv: list[str]) -> int:
    parser = _parser("delete", "Remove a version from the registry (its files stay where they are).")
    parser.add_argument("name")
    parser.add_argument("version", type=int)
    args = parser.parse_args(argv)
    _registry(args).delete(args.name, args.version)
    _emit(args, {"deleted": f"{args.name}@{args.version}"}, f"deleted {args.name}@{args.version} from the registry (its files are untouched)")
    return 0


COMMANDS = {
    "register": cmd_register, "list": cmd_list, "show": cmd_show, "promote": cmd_promote, "rollback": cmd_rollback,
    "diff": cmd_diff, "history": cmd_history, "delete": cmd_delete,
}  # fmt: skip


def cmd_registry(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if argv[0] not in COMMANDS:
        raise UsageError(f"Unknown command 'tunelab registry {argv[0]}'. Commands: {', '.join(COMMANDS)}.")
    return COMMANDS[argv[0]]([a for a in argv[1:] if a != "--debug"])
