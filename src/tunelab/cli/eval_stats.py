"""``tunelab eval human-sheet | agreement | ab``: human rating sheets, inter-rater agreement and
A/B tests. Each parses its flags, calls one function of ``tunelab.evaluation.human`` or
``tunelab.evaluation.ab`` and prints the report (``--json`` for JSON)."""

from tunelab.cli.data import _emit, _Parser
from tunelab.errors import TunelabError


def _named_path(value: str, flag: str, default_name: str | None = None) -> tuple[str, str]:
    """(name, path) from NAME=PATH; PATH alone takes ``default_name`` where one is allowed."""
    name, sep, path = value.partition("=")
    if sep and name.strip() and path.strip():
        return name.strip(), path.strip()
    if not sep and default_name is not None and value.strip():
        return default_name, value.strip()
    raise TunelabError(f"{flag} {value!r}: give NAME=PATH, e.g. {flag} tuned=runs/eval-tuned/predictions.jsonl.")


def cmd_human_sheet(argv: list[str]) -> int:
    from tunelab.evaluation.human import make_rating_sheets

    parser = _Parser(
        prog="tunelab eval human-sheet",
        description="Blind rating sheets (CSV per rater, a printable HTML page) of several models' generations, "
        "responses shuffled per item; key.json holds the unblinding key.",
    )  # fmt: skip
    parser.add_argument("--predictions", action="append", required=True, metavar="NAME=PATH",
                        help="a model's predictions.jsonl from tunelab eval generate; give it once per model")  # fmt: skip
    parser.add_argument("-o", "--output-dir", required=True, help="folder for sheet.csv, sheet.html, key.json and sheet-<rater>.csv")
    parser.add_argument("--items", type=int, help="rate this many items, sampled with --seed (default: every id present in all files)")
    parser.add_argument("--seed", type=int, default=0, help="sampling and response order (default 0)")
    parser.add_argument("--raters", help="comma-separated rater names: one sheet-<rater>.csv each, rater column filled")
    parser.add_argument("--scale", default="1-5", help="rating scale LOW-HIGH (default 1-5)")
    parser.add_argument("--overwrite", action="store_true", help="replace sheets already in the folder (they may hold ratings)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    predictions = {}
    for value in args.predictions:
        name, path = _named_path(value, "--predictions")
        if name in predictions:
            raise TunelabError(f"--predictions: the name '{name}' is given twice; give each model its own name.")
        predictions[name] = path
    raters = args.raters.split(",") if args.raters else None
    report = make_rating_sheets(
        predictions, args.output_dir, items=args.items, seed=args.seed, scale=args.scale, raters=raters, overwrite=args.overwrite
    )
    _emit(report, args.json)
    return 0


def cmd_agreement(argv: list[str]) -> int:
    from tunelab.evaluation.human import LEVELS, agreement, load_key, read_ratings

    parser = _Parser(
        prog="tunelab eval agreement",
        description="Krippendorff's alpha over filled rating sheets; with --key, each model's mean rating, preferences and win rates.",
    )  # fmt: skip
    parser.add_argument("ratings", nargs="+", metavar="RATINGS.csv", help="filled sheets (rater column filled, or named sheet-<rater>.csv)")
    parser.add_argument("--key", help="key.json written with the sheets: unblind the results")
    parser.add_argument("--level", choices=LEVELS, default="ordinal", help="level of measurement of the headline alpha (default ordinal)")
    parser.add_argument("--scale", help="rating scale LOW-HIGH (default: the key's, else 1-5)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    scale = args.scale or (load_key(args.key).get("scale") if args.key else None) or "1-5"
    report = agreement(read_ratings(args.ratings, scale=scale), key=args.key, level=args.level, seed=args.seed)
    _emit(report, args.json)
    return 0


def cmd_ab(argv: list[str]) -> int:
    from tunelab.evaluation.ab import KINDS, ab_test

    parser = _Parser(
        prog="tunelab eval ab",
        description="A/B test of two variants: a results table (variant column + outcome column), or two predictions "
        "files and a metric. 0/1 outcomes: two-proportion z test; scores: Welch and Mann-Whitney; paired "
        "predictions: also the paired bootstrap. Prints the sample size per arm for 80% power.",
        epilog="examples: tunelab eval ab results.csv --outcome success | "
        "tunelab eval ab --a base=runs/eval-base/predictions.jsonl --b tuned=runs/eval-tuned/predictions.jsonl --metric gsm8k",
    )  # fmt: skip
    parser.add_argument("results", nargs="?", metavar="RESULTS", help="CSV or JSON lines with a variant column and an outcome column")
    parser.add_argument("--a", metavar="[NAME=]PATH", help="the baseline's predictions.jsonl (instead of RESULTS)")
    parser.add_argument("--b", metavar="[NAME=]PATH", help="the candidate's predictions.jsonl (instead of RESULTS)")
    parser.add_argument("--metric", help="with --a/--b: the key of each row's scores to compare (e.g. gsm8k)")
    parser.add_argument("--outcome", help="RESULTS: the outcome column (default: outcome, success or score, whichever exists)")
    parser.add_argument("--variant-column", default="variant", help="RESULTS: the column naming the variant (default variant)")
    parser.add_argument("--baseline", help="RESULTS: the variant to call a (default: the first in sorted order)")
    parser.add_argument("--where", action="append", default=[], metavar="COLUMN=VALUE",
                        help="RESULTS: only rows whose COLUMN holds VALUE (repeatable; e.g. route=chat for a tunelab serve --ab-log file)")
    parser.add_argument("--kind", choices=KINDS, default="auto", help="proportion (0/1), score, or auto: proportion when every value is 0 or 1")
    parser.add_argument(
        "--effect", type=float, help="effect to size for: a difference in rate (proportions) or Cohen's d (scores); default: the observed one"
    )
    parser.add_argument("--alpha", type=float, default=0.05, help="significance level (default 0.05)")
    parser.add_argument("--power", type=float, default=0.8, help="power for the sample size (default 0.8)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    if args.results and (args.a or args.b):
        raise TunelabError("tunelab eval ab: give either RESULTS (a results table) or --a and --b (two predictions files), not both.")
    if args.results:
        if args.metric:
            raise TunelabError(
                "tunelab eval ab: --metric applies to predictions files (--a/--b); for a results table name the column with --outcome."
            )
        results = args.results
    elif args.a and args.b:
        (name_a, path_a), (name_b, path_b) = _named_path(args.a, "--a", "A"), _named_path(args.b, "--b", "B")
        if name_a == name_b:
            raise TunelabError(f"tunelab eval ab: --a and --b are both named '{name_a}'; give them different names (NAME=PATH).")
        results = {name_a: path_a, name_b: path_b}
    else:
        raise TunelabError(
            "tunelab eval ab: give RESULTS (a CSV or JSON lines file with variant and outcome columns), or both --a and --b (two "
            "predictions files) with --metric. See tunelab eval ab --help."
        )
    where = {}
    for spec in args.where:
        column, sep, value = spec.partition("=")
        if not sep or not column.strip():
            raise TunelabError(f"tunelab eval ab: --where {spec!r}: write COLUMN=VALUE (e.g. --where route=chat).")
        where[column.strip()] = value.strip()
    if where and not args.results:
        raise TunelabError("tunelab eval ab: --where filters a results table (RESULTS); it does not apply to --a/--b predictions files.")
    report = ab_test(results, metric=args.metric, kind=args.kind, outcome=args.outcome, variant_column=args.variant_column,
                     baseline=args.baseline, effect=args.effect, alpha=args.alpha, power=args.power, seed=args.seed, where=where)  # fmt: skip
    _emit(report, args.json)
    return 0
