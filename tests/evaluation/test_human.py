"""Human rating (tunelab.evaluation.human): blind sheets, reading filled sheets, Krippendorff's alpha
on the published worked example, and unblinding through the key."""

import csv
import json
from pathlib import Path

import krippendorff
import numpy as np
import pytest

from tunelab.cli.eval_stats import cmd_agreement, cmd_human_sheet
from tunelab.errors import TunelabError
from tunelab.evaluation.human import agreement, make_rating_sheets, read_ratings

BASE, TUNED = "quokka-base-zz1", "zebra-tuned-zz2"  # names that appear nowhere else
NAN = float("nan")
# Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability", section C: 4 observers x 12 units,
# missing values; alpha = 0.743 (nominal), 0.849 (interval).
PAPER = {
    "A": [1, 2, 3, 3, 2, 1, 4, 1, 2, NAN, NAN, NAN],
    "B": [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, NAN, 3],
    "C": [NAN, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, NAN],
    "D": [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, NAN],
}


def write_predictions(folder, ids, answer) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "predictions.jsonl"
    rows = [{"id": i, "prompt": f"What is {i} + {i}?", "reference": str(2 * i), "prediction": answer(i), "scores": {"exact_match": 1.0}} for i in ids]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


@pytest.fixture
def predictions(tmp_path):
    base = write_predictions(tmp_path / "secret-runs-base", range(20), lambda i: f"It is {2 * i + 1}.")
    tuned = write_predictions(tmp_path / "secret-runs-tuned", range(21), lambda i: f"{i} + {i} = {2 * i} <b>&</b>")
    return {BASE: base, TUNED: tuned}


def read_csv(path) -> list[dict]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        return list(csv.DictReader(f))


def write_csv(path, rows: list[dict]) -> str:
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


def test_sheets_are_blind_shuffled_and_reproducible(tmp_path, predictions):
    report = make_rating_sheets(predictions, tmp_path / "one", seed=0, raters=["alice", "bob"])
    assert (report.items, report.available, report.dropped) == (20, 20, 1)  # id 20 is only in the tuned file
    written = [tmp_path / "one" / name for name in ("sheet.csv", "sheet.html", "sheet-alice.csv", "sheet-bob.csv")]
    for path in written:
        text = path.read_text(encoding="utf-8-sig")
        for secret in (BASE, TUNED, "quokka", "zebra", "secret-runs", str(tmp_path), "predictions.jsonl"):
            assert secret not in text, f"{secret} leaks into {path.name}"
    html = written[1].read_text(encoding="utf-8")
    assert "&lt;b&gt;&amp;&lt;/b&gt;" in html and "<b>&</b>" not in html and "1</b> (worst)" in html and "5</b> (best)" in html
    rows = read_csv(written[2])
    assert list(rows[0]) == ["item", "prompt", "reference", "response_1", "response_2", "rating_1", "rating_2", "preferred", "rater"]
    assert {r["rater"] for r in rows} == {"alice"} and {r["rater"] for r in read_csv(written[0])} == {""}
    key = json.loads((tmp_path / "one" / "key.json").read_text())
    assert key["models"] == [BASE, TUNED] and key["seed"] == 0 and key["sources"] == predictions
    assert len({tuple(entry["responses"]) for entry in key["items"]}) == 2  # orders differ between items
    for entry, row in zip(key["items"], rows):  # the key says who wrote each response
        slot = entry["responses"].index(TUNED) + 1
        assert row[f"response_{slot}"].startswith(f"{entry['id']} + ")
    again = make_rating_sheets(predictions, tmp_path / "two", seed=0, raters=["alice", "bob"])
    for name in ("sheet.csv", "sheet.html", "sheet-alice.csv", "key.json"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
    assert again.items == 20
    sampled = make_rating_sheets(predictions, tmp_path / "three", items=5, seed=1)
    assert sampled.items == 5 and len(read_csv(tmp_path / "three" / "sheet.csv")) == 5
    with pytest.raises(TunelabError, match="already exist"):  # filled sheets are never overwritten silently
        make_rating_sheets(predictions, tmp_path / "one", seed=0)


def test_key_unblinds_the_ratings(tmp_path, predictions):
    make_rating_sheets(predictions, tmp_path, seed=0, raters=["alice", "bob"])
    key = json.loads((tmp_path / "key.json").read_text())
    order = {entry["item"]: entry["responses"] for entry in key["items"]}
    filled = []
    for rater in ("alice", "bob"):
        rows = read_csv(tmp_path / f"sheet-{rater}.csv")
        for row in rows:
            models = order[int(row["item"])]
            for slot, model in enumerate(models, 1):
                row[f"rating_{slot}"] = "5" if model == TUNED else "2"
            row["preferred"] = str(models.index(TUNED) + 1)
        filled.append(write_csv(tmp_path / f"sheet-{rater}.csv", rows))
    report = agreement(read_ratings(filled), key=tmp_path / "key.json")
    assert report.alpha["ordinal"] == pytest.approx(1.0) and report.raters == ["alice", "bob"]
    means = {m.model: (m.mean, m.ci_low, m.ci_high, m.preferred, m.ratings) for m in report.models}
    assert means == {TUNED: (5.0, 5.0, 5.0, 40, 40), BASE: (2.0, 2.0, 2.0, 0, 40)}
    (pair,) = report.pairs
    assert (pair.a, pair.b, pair.wins, pair.losses, pair.win_rate) == (BASE, TUNED, 20, 0, 1.0)
    assert pair.bootstrap.diff == pytest.approx(3.0)
    text = report.render()
    assert TUNED in text and "reliable" in text and "5.00" in text
    json.dumps(report.to_dict())


def paper_sheets(tmp_path) -> list[str]:
    """The worked example as filled sheets: one unit per item; D's sheet has no rater column (its name says)."""
    paths = []
    for rater, values in PAPER.items():
        rows = [{"item": i, "rating_1": "" if np.isnan(v) else str(v), "preferred": ""} for i, v in enumerate(values, 1)]
        if rater == "D":
            paths.append(write_csv(tmp_path / "sheet-D.csv", rows))
        else:
            paths.append(write_csv(tmp_path / f"filled-{rater}.csv", [{**row, "rater": rater} for row in rows]))
    return paths


def test_alpha_reproduces_krippendorffs_worked_example(tmp_path):
    ratings = read_ratings(paper_sheets(tmp_path))
    report = agreement(ratings, level="nominal")
    assert report.alpha["nominal"] == pytest.approx(0.743, abs=5e-4)
    assert report.alpha["interval"] == pytest.approx(0.849, abs=5e-4)
    direct = krippendorff.alpha(reliability_data=list(PAPER.values()), level_of_measurement="ordinal")
    assert report.alpha["ordinal"] == pytest.approx(direct, abs=1e-12)
    assert (report.units, report.pairable, report.ratings) == (12, 11, 41) and report.raters == ["A", "B", "C", "D"]
    assert "tentative" in report.interpretation  # 0.743
    assert "unreliable" in agreement(read_ratings(paper_sheets(tmp_path)[:2] + [write_csv(tmp_path / "sheet-E.csv", [
        {"item": i, "rating_1": str(6 - v) if not np.isnan(v) else ""} for i, v in enumerate(PAPER["B"], 1)])])).interpretation  # fmt: skip


def test_rating_sheet_errors(tmp_path):
    missing = write_csv(tmp_path / "filled.csv", [{"item": 1, "response_1": "x", "response_2": "y", "rating_1": "3"}])
    with pytest.raises(TunelabError) as err:
        read_ratings([missing])
    assert "filled.csv" in str(err.value) and "rating_2, rater" in str(err.value)
    bad = write_csv(tmp_path / "sheet-carol.csv", [{"item": 1, "rating_1": "4"}, {"item": 2, "rating_1": "good"}])
    with pytest.raises(TunelabError, match=r"sheet-carol\.csv', row 3 .*'good'"):
        read_ratings([bad])
    high = write_csv(tmp_path / "sheet-dave.csv", [{"item": 1, "rating_1": "7"}])
    with pytest.raises(TunelabError, match="outside the scale 1-5"):
        read_ratings([high])
    one = write_csv(tmp_path / "sheet-erin.csv", [{"item": 1, "rating_1": "4"}, {"item": 2, "rating_1": ""}])
    with pytest.raises(TunelabError, match="at least two raters.*1 \\(erin\\)"):
        agreement(read_ratings([one]))
    nameless = write_csv(tmp_path / "ratings.csv", [{"item": 1, "rating_1": "4", "rater": ""}])
    with pytest.raises(TunelabError, match="has no rater"):
        read_ratings([nameless])


def test_cli_sheet_and_agreement(tmp_path, predictions, capsys):
    args = [
        f"--predictions={BASE}={Path(predictions[BASE]).parent}",  # a run folder stands for its predictions.jsonl
        "--predictions",
        f"{TUNED}={predictions[TUNED]}",
        "-o",
        str(tmp_path / "s"),
    ]
    assert cmd_human_sheet([*args, "--items", "4", "--raters", "ann,ben", "--scale", "1-7"]) == 0
    out = capsys.readouterr().out
    assert "4 items x 2 responses" in out and "scale 1-7" in out
    assert json.loads((tmp_path / "s" / "key.json").read_text())["scale"] == [1, 7]
    paths = paper_sheets(tmp_path)
    assert cmd_agreement([*paths, "--level", "interval", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["alpha"]["interval"] == pytest.approx(0.849, abs=5e-4)
    with pytest.raises(TunelabError, match="at least two raters"):
        cmd_agreement(paths[:1])
    with pytest.raises(TunelabError, match="NAME=PATH"):
        cmd_human_sheet(["--predictions", predictions[BASE], "-o", str(tmp_path / "t")])
    with pytest.raises(TunelabError, match="--level"):
        cmd_agreement([*paths, "--level", "ratio-ish"])
