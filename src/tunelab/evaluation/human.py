"""Human rating of generations: blind sheets out, filled sheets in, agreement and unblinded results.

The flow is ``make_rating_sheets`` (one CSV per rater and a printable HTML page, responses
shuffled per item so no rater can tell which model wrote what, plus ``key.json`` to unblind them
afterwards), then ``read_ratings`` on the filled CSVs, then ``agreement``: Krippendorff's alpha
over raters, and, with the key, each model's mean rating, preferences and pairwise wins.

Agreement comes before results on purpose: a mean rating is only worth reading when the raters
agree on what the scale means, and Krippendorff's alpha (which handles any number of raters,
missing ratings and ordinal scales) is the standard check.

Predictions are the JSON lines ``tunelab eval generate`` writes, one row per data row::

    {"id": 17, "prompt": "...", "reference": "..." or null, "prediction": "...", "scores": {"gsm8k": 1.0}}

Filled sheets are the CSVs written here: ``item``, ``prompt``, ``reference``, ``response_1..k``,
``rating_1..k`` (a number on the scale, or blank for "not rated"), ``preferred`` (a response
number, ``tie``, or blank) and ``rater`` (or a file named ``sheet-<rater>.csv``).
"""

import csv
import html
import json
import logging
import math
import random
import re
from dataclasses import asdict, dataclass, field
from itertools import combinations
from pathlib import Path

import numpy as np

from tunelab.errors import TunelabError
from tunelab.evaluation.stats import BootstrapResult, bootstrap_mean_ci, paired_bootstrap

log = logging.getLogger(__name__)

LEVELS = ("nominal", "ordinal", "interval")
SHEET_CSV, SHEET_HTML, KEY_JSON = "sheet.csv", "sheet.html", "key.json"
RATER_FILE = re.compile(r"^sheet-(.+)\.csv$", re.IGNORECASE)
RATER_NAME = re.compile(r"^[\w.@+-]+$")
SHEET_COLUMNS = "item, prompt, reference, response_1..response_k, rating_1..rating_k, preferred and rater"


# ----------------------------------------------------------------------------- predictions


@dataclass
class Prediction:
    """One row of a predictions file."""

    id: int
    prompt: str
    reference: str | None
    prediction: str
    scores: dict
    line: int


def read_predictions(path: str | Path) -> dict[int, Prediction]:
    """The rows of one predictions file (JSON lines from ``tunelab eval generate``, or the run
    folder holding its ``predictions.jsonl``) by id."""
    path = Path(path)
    path = path / "predictions.jsonl" if path.is_dir() else path
    if not path.is_file():
        raise TunelabError(f"Predictions file '{path}' does not exist. Give the predictions.jsonl that `tunelab eval generate` wrote, or its folder.")
    rows: dict[int, Prediction] = {}
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            row = _prediction_row(path, number, line)
            if row.id in rows:
                raise TunelabError(
                    f"Predictions file '{path}', line {number}: id {row.id} already appears on line {rows[row.id].line}; each data row is "
                    "predicted once per file."
                )
            rows[row.id] = row
    if not rows:
        raise TunelabError(f"Predictions file '{path}' has no rows. Run `tunelab eval generate` again or check the path.")
    return rows


def _prediction_row(path: Path, number: int, line: str) -> Prediction:
    where = f"Predictions file '{path}', line {number}"
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise TunelabError(f"{where} is not valid JSON ({err.msg}). Each line must be one object written by `tunelab eval generate`.") from None
    if not isinstance(row, dict):
        raise TunelabError(f"{where} is a JSON {type(row).__name__}, not an object with id, prompt, reference, prediction and scores.")
    if isinstance(row.get("id"), bool) or not isinstance(row.get("id"), int):
        raise TunelabError(f"{where}: 'id' must be the row's index in the data file (a whole number); found {row.get('id')!r}.")
    if not isinstance(row.get("prediction"), str):
        raise TunelabError(f"{where}: 'prediction' must be the generated text (a string); found {row.get('prediction')!r}.")
    scores = row.get("scores") or {}
    if not isinstance(scores, dict):
        raise TunelabError(f"{where}: 'scores' must be an object of metric name to number; found {scores!r}.")
    reference = row.get("reference")
    return Prediction(row["id"], str(row.get("prompt") or ""), None if reference is None else str(reference), row["prediction"], scores, number)


def _common_ids(files: dict[str, dict[int, Prediction]]) -> tuple[list[int], int]:
    """Ids present in every file, sorted, and how many ids some file lacks."""
    sets = [set(rows) for rows in files.values()]
    common, every = set.intersection(*sets), set.union(*sets)
    return sorted(common), len(every) - len(common)


# ----------------------------------------------------------------------------- sheets


def parse_scale(value) -> tuple[int, int]:
    """``(1, 5)`` from ``(1, 5)``, ``"1-5"`` or ``"1..5"``: whole numbers, low below high."""
    if isinstance(value, str):
        parts = re.fullmatch(r"\s*(-?\d+)\s*(?:-|\.\.|,|:)\s*(-?\d+)\s*", value)
        value = (int(parts[1]), int(parts[2])) if parts else None
    if not (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        and value[0] < value[1]
    ):
        raise TunelabError(f"scale={value!r}: give the rating scale as two whole numbers, low then high, such as 1-5 or (1, 5).")
    return int(value[0]), int(value[1])


@dataclass
class SheetReport:
    """What ``make_rating_sheets`` wrote."""

    out_dir: str
    files: list[str]
    models: int
    items: int
    available: int  # ids present in every predictions file
    dropped: int  # ids missing from at least one file, left out
    seed: int
    scale: tuple[int, int]
    raters: list[str] = field(default_factory=list)
    prompt_mismatches: int = 0  # ids whose prompt differs between files (the sheet shows the first file's)
    name_mentions: dict[str, int] = field(default_factory=dict)  # model name -> sheet cells that contain it

    def to_dict(self) -> dict:
        return asdict(self)

    def render(self) -> str:
        lines = [
            f"rating sheets: {self.items} items x {self.models} responses (blind, shuffled per item with seed {self.seed}), scale "
            f"{self.scale[0]}-{self.scale[1]}"
        ]
        lines.append(
            f"  items: {self.items} of {self.available} ids present in every predictions file"
            + (f"; {self.dropped} ids missing from some file were left out" if self.dropped else "")
        )
        if self.raters:
            lines.append(f"  raters: {', '.join(self.raters)} (one sheet each)")
        if self.prompt_mismatches:
            lines.append(
                f"  warning: {self.prompt_mismatches} ids have different prompts in different files; the sheets show the first file's. "
                "Were all files generated from the same data?"
            )
        for name, count in self.name_mentions.items():
            lines.append(
                f"  warning: the model name '{name}' appears in {count} sheet cells (prompt or response text); raters may be able to tell "
                "the models apart"
            )
        lines += [f"  wrote {path}" for path in self.files]
        lines.append(f"  keep {Path(self.out_dir) / KEY_JSON} from the raters: it says which model wrote each response")
        return "\n".join(lines)


def make_rating_sheets(predictions: dict, out_dir: str | Path, items: int | None = None, seed: int = 0,
                       scale=(1, 5), raters: list[str] | None = None, overwrite: bool = False) -> SheetReport:  # fmt: skip
    """Write blind rating sheets for the generations of several models (``{name: predictions file}``).

    Rows are matched by id and only ids present in every file are rated. ``items`` samples that
    many (seeded; all when None). Each item's responses are shuffled with its own generator,
    ``random.Random(f"{seed}:{id}")``, so the order does not depend on which other items were
    sampled and the same seed always gives the same sheets. Nothing the raters get names a model
    or a file: the mapping is in ``key.json`` only. Existing sheets are not overwritten (they may
    hold ratings) unless ``overwrite``."""
    if not predictions:
        raise TunelabError(
            "make_rating_sheets: give at least one model's predictions as {name: path} (on the command line, --predictions NAME=PATH)."
        )
    scale = parse_scale(scale)
    raters = _rater_names(raters)
    if items is not None and (isinstance(items, bool) or not isinstance(items, int) or items < 1):
        raise TunelabError(f"items={items!r}: give the number of items to rate (a whole number of at least 1), or leave it out to rate every item.")
    files = {name: read_predictions(path) for name, path in predictions.items()}
    ids, dropped = _common_ids(files)
    if not ids:
        raise TunelabError(
            f"No id is present in every predictions file ({', '.join(map(str, predictions.values()))}): were they generated from the same data file?"
        )
    if dropped:
        log.info("%d ids are missing from at least one predictions file; they are left out of the sheets", dropped)
    chosen = sorted(random.Random(seed).sample(ids, items)) if items is not None and items < len(ids) else ids
    models = list(predictions)
    sheet = [_sheet_item(number, files, models, id_, seed) for number, id_ in enumerate(chosen, 1)]
    out_dir = Path(out_dir)
    targets = [out_dir / SHEET_CSV, out_dir / SHEET_HTML, out_dir / KEY_JSON] + [out_dir / f"sheet-{r}.csv" for r in raters]
    existing = [str(p) for p in targets if p.exists()]
    if existing and not overwrite:
        raise TunelabError(
            f"{', '.join(existing)} already exist{'s' * (len(existing) == 1)} and may hold ratings; choose another output folder or pass --overwrite."
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    k = len(models)
    _write_sheet_csv(targets[0], sheet, k, "")
    for rater, path in zip(raters, targets[3:]):
        _write_sheet_csv(path, sheet, k, rater)
    targets[1].write_text(_sheet_html(sheet, k, scale), encoding="utf-8")
    key = {
        "seed": seed, "scale": list(scale), "models": models, "sources": {name: str(path) for name, path in predictions.items()},
        "dropped_ids": dropped, "items": [{"item": s["item"], "id": s["id"], "responses": s["models"]} for s in sheet],
    }  # fmt: skip
    targets[2].write_text(json.dumps(key, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    mismatches = sum(1 for id_ in chosen if len({files[m][id_].prompt for m in models}) > 1)
    return SheetReport(
        str(out_dir), [str(p) for p in targets], k, len(sheet), len(ids), dropped, seed, scale, raters, mismatches, _mentions(sheet, models)
    )


def _rater_names(raters) -> list[str]:
    names = [r.strip() for r in (raters or []) if r.strip()]
    bad = [r for r in names if not RATER_NAME.match(r)]
    if bad:
        raise TunelabError(
            f"Rater name(s) {', '.join(map(repr, bad))}: use letters, digits and . _ @ + - only (each name becomes a file name, sheet-<rater>.csv)."
        )
    if len(set(names)) < len(names):
        raise TunelabError(f"raters: {', '.join(names)} names someone twice; give each rater once.")
    return names


def _sheet_item(number: int, files: dict, models: list[str], id_: int, seed: int) -> dict:
    order = list(models)
    random.Random(f"{seed}:{id_}").shuffle(order)
    first = files[models[0]][id_]
    return {
        "item": number, "id": id_, "prompt": first.prompt, "reference": first.reference or "",
        "models": order, "responses": [files[m][id_].prediction for m in order],
    }  # fmt: skip


def _write_sheet_csv(path: Path, sheet: list[dict], k: int, rater: str) -> None:
    header = [
        "item",
        "prompt",
        "reference",
        *(f"response_{i}" for i in range(1, k + 1)),
        *(f"rating_{i}" for i in range(1, k + 1)),
        "preferred",
        "rater",
    ]
    # utf-8 with a BOM: Excel opens it as UTF-8 (without one it guesses a legacy code page); read_ratings accepts both.
    with path.open("w", encoding="utf-8-sig", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(header)
        for s in sheet:
            writer.writerow([s["item"], s["prompt"], s["reference"], *s["responses"], *[""] * k, "", rater])


def _mentions(sheet: list[dict], models: list[str]) -> dict[str, int]:
    """Sheet cells in which a model's name appears as a word: generated text can give a model away."""
    found = {}
    for name in models:
        pattern = re.compile(rf"(?<!\w){re.escape(name)}(?!\w)", re.IGNORECASE)
        count = sum(1 for s in sheet for text in (s["prompt"], s["reference"], *s["responses"]) if pattern.search(text))
        if count:
            found[name] = count
    return found


HTML_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 1200px; padding: 0 1rem; color: #222; }
h1 { font-size: 1.4rem; }
.instructions { background: #f5f5f5; border-left: 4px solid #4c78a8; padding: .5rem 1rem; margin-bottom: 2rem; }
.item { border-top: 2px solid #ccc; padding: 1rem 0; break-inside: avoid; page-break-inside: avoid; }
.label { font-size: .8rem; font-weight: 600; text-transform: uppercase; color: #666; margin: .6rem 0 .2rem; }
.text { white-space: pre-wrap; word-wrap: break-word; font-family: ui-monospace, Menlo, Consolas, monospace; font-size: .85rem; }
.responses { display: grid; grid-template-columns: repeat(var(--k), minmax(0, 1fr)); gap: 1rem; }
.response { border: 1px solid #ccc; border-radius: 4px; padding: .5rem; }
.rate { margin-top: .5rem; font-size: .9rem; }
.box { display: inline-block; border: 1px solid #888; min-width: 1.6rem; text-align: center; margin-right: .2rem; }
@media print { body { margin: 0; max-width: none; } .instructions { border-left-color: #000; } }
"""


def _sheet_html(sheet: list[dict], k: int, scale: tuple[int, int]) -> str:
    """One self-contained page (no scripts, no external files): the instructions, then every item
    with its responses side by side and boxes to tick when printed."""
    low, high = scale
    boxes = "".join(f'<span class="box">{v}</span>' for v in range(low, high + 1))
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', "<title>Rating sheet</title>",
        f"<style>{HTML_STYLE}</style></head>", f'<body style="--k: {k}">', "<h1>Rating sheet</h1>", '<div class="instructions">',
        f"<p>For each item, read the prompt (and the reference answer, where there is one), then rate each response on a scale "
        f"from <b>{low}</b> (worst) to <b>{high}</b> (best). Rate each response on its own merits; the order of the responses "
        f"is random and changes from item to item.</p>",
        f"<p>Write the ratings in the sheet's <code>rating_1</code> to <code>rating_{k}</code> columns (leave a cell blank if you "
        "cannot judge a response). In <code>preferred</code>, write the number of the response you prefer overall, <code>tie</code> "
        "if you have no preference, or leave it blank. Put your name in <code>rater</code> if it is not filled in.</p>",
        f"<p>{len(sheet)} items, {k} response{'s' * (k > 1)} each.</p></div>",
    ]  # fmt: skip
    for s in sheet:
        parts.append(f'<section class="item"><h2>Item {s["item"]}</h2>')
        parts.append(f'<div class="label">Prompt</div><div class="text">{html.escape(s["prompt"])}</div>')
        if s["reference"]:
            parts.append(f'<div class="label">Reference</div><div class="text">{html.escape(s["reference"])}</div>')
        parts.append('<div class="responses">')
        for number, text in enumerate(s["responses"], 1):
            parts.append(
                f'<div class="response"><div class="label">Response {number}</div><div class="text">{html.escape(text)}</div>'
                f'<div class="rate">Rating: {boxes}</div></div>'
            )
        parts.append("</div></section>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


# ----------------------------------------------------------------------------- filled sheets


@dataclass
class RatingRow:
    """One rater's row of a sheet: a rating per response slot (None where blank)."""

    file: str
    row: int  # spreadsheet row number (the header is row 1)
    rater: str
    item: int
    ratings: list[float | None]
    preferred: int | str | None  # response number, "tie", or None


@dataclass
class Ratings:
    """Every filled row of one or more sheets."""

    rows: list[RatingRow]
    files: list[str]
    scale: tuple[int, int]

    @property
    def raters(self) -> list[str]:
        return list(dict.fromkeys(row.rater for row in self.rows))


def read_ratings(paths, scale=(1, 5)) -> Ratings:
    """Read filled rating sheets (CSV). Each row needs a rater: the ``rater`` column, or the file's
    name when it is ``sheet-<rater>.csv``. Blank ratings are missing data (Krippendorff's alpha
    handles them); anything else must be a number on the scale."""
    scale = parse_scale(scale)
    paths = [Path(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]
    if not paths:
        raise TunelabError("read_ratings: give at least one filled rating sheet (CSV).")
    rows: list[RatingRow] = []
    seen: dict[tuple[str, int], RatingRow] = {}
    for path in paths:
        for row in _read_sheet(path, scale):
            other = seen.get((row.rater, row.item))
            if other is not None:
                raise TunelabError(
                    f"Rater '{row.rater}' rated item {row.item} twice: '{other.file}' row {other.row} and '{row.file}' row {row.row}. "
                    "Remove one of them (or give the second rater their own name)."
                )
            seen[(row.rater, row.item)] = row
            rows.append(row)
    return Ratings(rows, [str(p) for p in paths], scale)


def _read_sheet(path: Path, scale: tuple[int, int]) -> list[RatingRow]:
    if not path.is_file():
        raise TunelabError(f"Rating sheet '{path}' does not exist. Give the filled sheet-<rater>.csv (or sheet.csv) files.")
    if path.suffix.lower() != ".csv":
        raise TunelabError(f"Rating sheet '{path}' is not a CSV file. Save the filled sheet as CSV (File > Save as > CSV, UTF-8) and give that file.")
    from_name = RATER_FILE.match(path.name)
    with path.open(encoding="utf-8-sig", newline="") as lines:
        reader = csv.reader(lines)
        header = [name.strip() for name in next(reader, [])]
        slots = _check_header(path, header, from_name is not None)
        column = {name: index for index, name in enumerate(header)}
        rows = []
        for number, values in enumerate(reader, 2):
            cells = {name: (values[i].strip() if i < len(values) else "") for name, i in column.items()}
            if not any(cells.values()):
                continue
            rows.append(_rating_row(path, number, cells, slots, scale, from_name[1] if from_name else None))
    return rows


def _check_header(path: Path, header: list[str], rater_from_name: bool) -> int:
    """The number of response slots, or an error listing the missing columns."""
    numbers = [int(m[1]) for name in header if (m := re.fullmatch(r"(?:rating|response)_(\d+)", name))]
    slots = max(numbers, default=1)
    required = ["item", *(f"rating_{i}" for i in range(1, slots + 1))] + ([] if rater_from_name else ["rater"])
    missing = [name for name in required if name not in header]
    if missing:
        raise TunelabError(
            f"Rating sheet '{path}' lacks the column{'s' * (len(missing) > 1)} {', '.join(missing)} (found: {', '.join(header) or 'no header'}). "
            f"A sheet from `tunelab eval human-sheet` has the columns {SHEET_COLUMNS}; the rater column may be left out when the "
            "file is named sheet-<rater>.csv. Fill in a copy of that sheet rather than a new table."
        )
    return slots


def _rating_row(path: Path, number: int, cells: dict, slots: int, scale: tuple[int, int], rater_from_name: str | None) -> RatingRow:
    where = f"Rating sheet '{path}', row {number} (the header is row 1)"
    try:
        item = int(cells["item"])
    except ValueError:
        raise TunelabError(f"{where}: item is {cells['item']!r}, not an item number. Keep the item column as the sheet was written.") from None
    rater = cells.get("rater") or rater_from_name
    if not rater:
        raise TunelabError(f"{where} has no rater. Fill in the rater column, or name the file sheet-<rater>.csv.")
    ratings = [_rating(where, f"rating_{i}", cells.get(f"rating_{i}", ""), scale) for i in range(1, slots + 1)]
    return RatingRow(str(path), number, rater, item, ratings, _preferred(where, cells.get("preferred", ""), slots))


def _rating(where: str, name: str, value: str, scale: tuple[int, int]) -> float | None:
    if value == "":
        return None
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        raise TunelabError(f"{where}: {name} is {value!r}, not a number. Write a rating from {scale[0]} to {scale[1]}, or leave the cell blank.")
    if not scale[0] <= number <= scale[1]:
        raise TunelabError(
            f"{where}: {name} is {value}, outside the scale {scale[0]}-{scale[1]}. Correct it (or give the sheet's scale with --scale)."
        )
    return number


def _preferred(where: str, value: str, slots: int) -> int | str | None:
    if value == "":
        return None
    if value.lower() == "tie":
        return "tie"
    if value.isdigit() and 1 <= int(value) <= slots:
        return int(value)
    raise TunelabError(f"{where}: preferred is {value!r}; write a response number from 1 to {slots}, 'tie', or leave it blank.")


def load_key(path: str | Path) -> dict:
    """The unblinding key ``make_rating_sheets`` wrote, checked."""
    path = Path(path)
    if not path.is_file():
        raise TunelabError(f"Key file '{path}' does not exist. Give the key.json that `tunelab eval human-sheet` wrote beside the sheets.")
    try:
        key = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise TunelabError(
            f"Key file '{path}' is not valid JSON ({err.msg}, line {err.lineno}). Use the key.json written with the sheets, unedited."
        ) from None
    return _checked_key(key, str(path))


def _checked_key(key: dict, where: str) -> dict:
    items = key.get("items") if isinstance(key, dict) else None
    if not isinstance(items, list) or not all(
        isinstance(i, dict) and isinstance(i.get("item"), int) and isinstance(i.get("responses"), list) for i in items
    ):
        raise TunelabError(f"Key {where} has no list of items with 'item' and 'responses'; use the key.json written with the sheets, unedited.")
    return key


# ----------------------------------------------------------------------------- agreement


def interpret_alpha(alpha: float | None) -> str:
    """Krippendorff's guideline (Content Analysis, 2004, p. 241)."""
    if alpha is None:
        return "undefined"
    if alpha >= 0.800:
        return "reliable (alpha >= 0.800)"
    if alpha >= 0.667:
        return "tentative conclusions only (0.667 <= alpha < 0.800)"
    return "unreliable: do not draw conclusions from these ratings (alpha < 0.667)"


@dataclass
class ModelResult:
    """One model's ratings, unblinded."""

    model: str
    items: int  # items with at least one rating of this model
    ratings: int
    mean: float | None  # mean over items of the item's mean rating
    ci_low: float | None
    ci_high: float | None
    preferred: int  # rows whose 'preferred' is this model's response


@dataclass
class PairResult:
    """Model b against model a, item by item (each item's mean rating over raters)."""

    a: str
    b: str
    items: int
    wins: int  # items where b's mean rating is higher
    ties: int
    losses: int
    win_rate: float | None  # (wins + ties / 2) / items
    bootstrap: BootstrapResult | None  # mean rating of b minus a, paired over items


@dataclass
class AgreementReport:
    """Inter-rater agreement and, with the key, the unblinded results."""

    level: str
    alpha: dict  # level -> Krippendorff's alpha (None where undefined)
    interpretation: str
    raters: list[str]
    units: int  # (item, response) pairs with at least one rating
    pairable: int  # units rated by at least two raters (the only ones alpha uses)
    ratings: int
    notes: list[str] = field(default_factory=list)
    key: str | None = None
    models: list[ModelResult] = field(default_factory=list)
    ties: int = 0
    no_preference: int = 0
    pairs: list[PairResult] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def render(self) -> str:
        value = self.alpha.get(self.level)
        lines = [f"Krippendorff's alpha ({self.level}): {'undefined' if value is None else f'{value:.3f}'}: {self.interpretation}"]
        lines.append("  " + " · ".join(f"{level} {'undefined' if a is None else f'{a:.3f}'}" for level, a in self.alpha.items()))
        lines.append(
            f"  {len(self.raters)} raters ({', '.join(self.raters)}) · {self.units} units (item x response) · {self.pairable} rated twice "
            f"or more · {self.ratings} ratings"
        )
        lines += [f"  note: {note}" for note in self.notes]
        if self.models:
            lines.append(f"unblinded with {self.key}:")
            lines += ["  " + line for line in self._table()]
            lines.append(f"  preferred: {self.ties} ties, {self.no_preference} rows without a preference")
        for pair in self.pairs:
            if not pair.items:
                lines.append(f"  {pair.b} vs {pair.a}: no item rated for both")
                continue
            lines.append(
                f"  {pair.b} vs {pair.a}: {pair.b} wins {pair.wins}, ties {pair.ties}, loses {pair.losses} of {pair.items} items (win rate "
                f"{pair.win_rate:.1%})"
            )
            if pair.bootstrap is not None:
                lines.append(f"    mean rating, {pair.bootstrap.render()}")
        return "\n".join(lines)

    def _table(self) -> list[str]:
        chosen = sum(m.preferred for m in self.models) + self.ties
        head = ["model", "items", "ratings", "mean", "95% CI", "preferred"]
        body = [[
            m.model, str(m.items), str(m.ratings), "-" if m.mean is None else f"{m.mean:.2f}",
            "-" if m.ci_low is None else f"{m.ci_low:.2f} to {m.ci_high:.2f}", f"{m.preferred} ({m.preferred / chosen:.0%})" if chosen else "0",
        ] for m in self.models]  # fmt: skip
        widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
        return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [head, *body]]


def agreement(ratings: Ratings, key=None, level: str = "ordinal", n_resamples: int = 2000, seed: int = 0) -> AgreementReport:
    """Krippendorff's alpha over the raters of ``ratings`` (units are (item, response) pairs;
    a blank rating is missing data), at every level of measurement, with ``level`` as the
    headline. With ``key`` (the key.json path or its contents) each model's mean rating gets a
    bootstrap interval over items, plus preference counts and pairwise win rates."""
    if level not in LEVELS:
        raise TunelabError(f"level={level!r}: choose one of {', '.join(LEVELS)} (ordinal suits rating scales).")
    raters = ratings.raters
    if len(raters) < 2:
        found = f"{len(raters)} ({', '.join(raters)})" if raters else "none"
        raise TunelabError(
            f"Agreement needs at least two raters; the sheets ({', '.join(ratings.files)}) have {found}. Give every rater's "
            "filled sheet, each with its rater column filled or named sheet-<rater>.csv."
        )
    units = sorted({(row.item, slot) for row in ratings.rows for slot, value in enumerate(row.ratings) if value is not None})
    matrix = _reliability_data(ratings, raters, units)
    pairable = int((np.sum(~np.isnan(matrix), axis=0) >= 2).sum()) if units else 0
    alphas, notes = _alphas(matrix)
    report = AgreementReport(level, alphas, interpret_alpha(alphas[level]), raters, len(units), pairable, int(np.sum(~np.isnan(matrix))), notes)
    if key is not None:
        report.key = str(key) if isinstance(key, (str, Path)) else "the key"
        _unblind(report, ratings, load_key(key) if isinstance(key, (str, Path)) else _checked_key(key, "given"), n_resamples, seed)
    return report


def _reliability_data(ratings: Ratings, raters: list[str], units: list[tuple[int, int]]) -> np.ndarray:
    """Raters x units, NaN where a rater gave no rating: the layout ``krippendorff.alpha`` takes."""
    row_of, column_of = {r: i for i, r in enumerate(raters)}, {u: i for i, u in enumerate(units)}
    matrix = np.full((len(raters), len(units)), np.nan)
    for row in ratings.rows:
        for slot, value in enumerate(row.ratings):
            if value is not None:
                matrix[row_of[row.rater], column_of[(row.item, slot)]] = value
    return matrix


def _alphas(matrix: np.ndarray) -> tuple[dict, list[str]]:
    import krippendorff

    alphas, notes = {}, []
    for level in LEVELS:
        try:
            alphas[level] = float(krippendorff.alpha(reliability_data=matrix, level_of_measurement=level))
        except ValueError as err:  # one value in all the data, or no unit rated twice: alpha is undefined
            alphas[level] = None
            reason = f"alpha is undefined: {err} (krippendorff)"
            if reason not in notes:
                notes.append(reason)
    return alphas, notes


def _unblind(report: AgreementReport, ratings: Ratings, key: dict, n_resamples: int, seed: int) -> None:
    by_item = {entry["item"]: entry["responses"] for entry in key["items"]}
    models = list(key.get("models") or dict.fromkeys(m for responses in by_item.values() for m in responses))
    per_item: dict[str, dict[int, list[float]]] = {m: {} for m in models}
    preferred = dict.fromkeys(models, 0)
    for row in ratings.rows:
        responses = by_item.get(row.item)
        if responses is None or len(row.ratings) > len(responses):
            what = "is not in the key" if responses is None else f"has {len(row.ratings)} responses, the key {len(responses)}"
            raise TunelabError(f"Rating sheet '{row.file}', row {row.row}: item {row.item} {what}. Was the sheet made with another key?")
        for slot, value in enumerate(row.ratings):
            if value is not None:
                per_item.setdefault(responses[slot], {}).setdefault(row.item, []).append(value)
        if row.preferred == "tie":
            report.ties += 1
        elif row.preferred is None:
            report.no_preference += 1
        else:
            preferred[responses[row.preferred - 1]] = preferred.get(responses[row.preferred - 1], 0) + 1
    means = {m: {item: float(np.mean(values)) for item, values in items.items()} for m, items in per_item.items()}
    for m in models:
        report.models.append(_model_result(m, per_item[m], means[m], preferred[m], n_resamples, seed))
    report.pairs = [_pair(a, b, means[a], means[b], n_resamples, seed) for a, b in combinations(models, 2)]


def _model_result(model: str, ratings: dict[int, list[float]], means: dict[int, float], preferred: int, n_resamples: int, seed: int) -> ModelResult:
    # Items, not ratings, are the independent draws: resampling item means keeps raters of one item together.
    if not means:
        return ModelResult(model, 0, 0, None, None, None, preferred)
    ci = bootstrap_mean_ci(list(means.values()), n_resamples=n_resamples, seed=seed)
    return ModelResult(model, len(means), sum(map(len, ratings.values())), ci.mean, ci.ci_low, ci.ci_high, preferred)


def _pair(a: str, b: str, means_a: dict[int, float], means_b: dict[int, float], n_resamples: int, seed: int) -> PairResult:
    items = sorted(set(means_a) & set(means_b))
    if not items:
        return PairResult(a, b, 0, 0, 0, 0, None, None)
    wins = sum(means_b[i] > means_a[i] for i in items)
    ties = sum(means_b[i] == means_a[i] for i in items)
    boot = paired_bootstrap([means_a[i] for i in items], [means_b[i] for i in items], n_resamples=n_resamples, seed=seed)
    return PairResult(a, b, len(items), wins, ties, len(items) - wins - ties, (wins + ties / 2) / len(items), boot)
