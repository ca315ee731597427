"""A/B tests (tunelab.evaluation.ab): results tables and paired predictions files, checked against scipy."""

import json

import numpy as np
import pytest
from scipy import stats as sp

from tunelab.cli.eval_stats import cmd_ab
from tunelab.errors import TunelabError
from tunelab.evaluation.ab import ab_test
from tunelab.evaluation.stats import sample_size_means, sample_size_proportions

RNG = np.random.default_rng(11)
SCORES_A = RNG.normal(0.55, 0.2, 40).round(3).tolist()
SCORES_B = RNG.normal(0.65, 0.2, 50).round(3).tolist()


def write_csv(path, header: str, rows: list[str]) -> str:
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return str(path)


def proportion_file(tmp_path) -> str:
    rows = [f"A,{int(i < 40)}" for i in range(100)] + [f"B,{'true' if i < 55 else 'false'}" for i in range(100)]
    return write_csv(tmp_path / "results.csv", "variant,success", rows)


def write_predictions(path, scores: dict[int, float]) -> str:
    rows = [{"id": i, "prompt": f"q{i}", "reference": "r", "prediction": "p", "scores": {"gsm8k": s, "format": 1.0}} for i, s in scores.items()]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_proportions_equal_chi_squared_and_size_the_observed_effect(tmp_path):
    report = ab_test(proportion_file(tmp_path))
    assert (report.kind, report.outcome, report.a, report.b, report.n_a, report.n_b) == ("proportion", "success", "A", "B", 100, 100)
    _, p, _, _ = sp.chi2_contingency([[40, 60], [55, 45]], correction=False)
    assert report.p_value == pytest.approx(p, abs=1e-9) and report.significant
    assert report.proportion.diff == pytest.approx(0.15)
    assert report.sample_size == sample_size_proportions(0.40, 0.55)
    given = ab_test(proportion_file(tmp_path), effect=0.05)
    assert given.sample_size == sample_size_proportions(0.40, 0.45) and given.sample_size_basis == "given"
    text = report.render()
    assert "significant at 5%? yes" in text and "per arm" in text and "Newcombe" in text


def test_scores_get_welch_and_mann_whitney_equal_to_scipy(tmp_path):
    path = tmp_path / "results.jsonl"
    rows = [{"variant": "control", "score": s} for s in SCORES_A] + [{"variant": "treatment", "score": s} for s in SCORES_B]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = ab_test(path)
    assert report.kind == "score" and (report.a, report.b) == ("control", "treatment")
    welch = sp.ttest_ind(SCORES_B, SCORES_A, equal_var=False)
    assert report.welch.p_value == pytest.approx(welch.pvalue, abs=1e-9) and report.welch.t == pytest.approx(welch.statistic, abs=1e-9)
    assert report.mann_whitney.p_value == pytest.approx(sp.mannwhitneyu(SCORES_B, SCORES_A, alternative="two-sided").pvalue, abs=1e-9)
    assert report.primary == "Welch t test" and report.p_value == report.welch.p_value
    assert report.sample_size == sample_size_means(report.welch.cohens_d)
    flipped = ab_test(path, baseline="treatment")
    assert flipped.a == "treatment" and flipped.welch.diff == pytest.approx(-report.welch.diff)
    json.dumps(report.to_dict())


def test_paired_prediction_files_add_the_paired_bootstrap(tmp_path):
    rng = np.random.default_rng(2)
    base = rng.uniform(0, 1, 30)
    a = write_predictions(tmp_path / "a.jsonl", dict(enumerate(base.round(3))))
    b = write_predictions(tmp_path / "b.jsonl", {**dict(enumerate((base + 0.05).round(3))), 30: 1.0})  # id 30 only in b
    report = ab_test({"base": a, "tuned": b}, metric="gsm8k")
    assert (report.a, report.b, report.n_a, report.n_b, report.unpaired_ids) == ("base", "tuned", 30, 31, 1)
    assert report.primary == "paired bootstrap" and report.paired.n == 30 and report.paired.diff == pytest.approx(0.05, abs=1e-3)
    assert report.significant and not ab_test({"base": a, "tuned": b}, metric="gsm8k").welch.p_value < 0.05  # pairing finds what Welch misses
    assert ab_test({"base": a, "tuned": b}, metric="gsm8k", seed=5).paired == ab_test({"base": a, "tuned": b}, metric="gsm8k", seed=5).paired
    with pytest.raises(TunelabError, match="needs --metric.*format, gsm8k"):
        ab_test({"base": a, "tuned": b})
    with pytest.raises(TunelabError, match="line 1 has no score 'bleu'"):
        ab_test({"base": a, "tuned": b}, metric="bleu")


def test_bad_results_files(tmp_path):
    three = write_csv(tmp_path / "three.csv", "variant,outcome", ["A,1", "B,0", "C,1", "A,0", "B,1"])
    with pytest.raises(TunelabError, match="has 3: 'A' \\(2 rows\\), 'B' \\(2 rows\\), 'C' \\(1 rows\\)"):
        ab_test(three)
    columns = write_csv(tmp_path / "columns.csv", "arm,result", ["A,1", "B,0"])
    with pytest.raises(TunelabError, match="no column 'variant'; its columns are arm, result"):
        ab_test(columns)
    with pytest.raises(TunelabError, match="none of the outcome columns.*its columns are variant, result"):
        ab_test(write_csv(tmp_path / "outcome.csv", "variant,result", ["A,1", "B,0"]))
    text = write_csv(tmp_path / "text.csv", "variant,outcome", ["A,1", "A,0", "B,maybe", "B,1"])
    with pytest.raises(TunelabError, match="text.csv', line 4: outcome is 'maybe', not a number"):
        ab_test(text)
    few = write_csv(tmp_path / "few.csv", "variant,outcome", ["A,1", "A,0", "B,1"])
    with pytest.raises(TunelabError, match="variant 'B' has 1 row with an outcome; .* at least 2"):
        ab_test(few)
    scores = write_csv(tmp_path / "scores.csv", "variant,score", ["A,0.5", "A,1", "B,0", "B,1"])
    with pytest.raises(TunelabError, match="line 2 \\(variant A\\): outcome 0.5 is not 0 or 1"):
        ab_test(scores, kind="proportion")


def test_cli(tmp_path, capsys):
    results = proportion_file(tmp_path)
    assert cmd_ab([results]) == 0
    assert "two-proportion z test" in capsys.readouterr().out
    assert cmd_ab([results, "--json", "--kind", "score"]) == 0
    assert json.loads(capsys.readouterr().out)["welch"]["n_a"] == 100
    a = write_predictions(tmp_path / "a.jsonl", {i: float(i % 2) for i in range(10)})
    b = write_predictions(tmp_path / "b.jsonl", {i: float(i % 3 > 0) for i in range(10)})
    assert cmd_ab(["--a", f"base={a}", "--b", b, "--metric", "gsm8k", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["a"], out["b"], out["kind"], out["paired"]["n"]) == ("base", "B", "proportion", 10)
    with pytest.raises(TunelabError, match="give RESULTS"):
        cmd_ab(["--a", a])
    with pytest.raises(TunelabError, match="not both"):
        cmd_ab([results, "--a", a, "--b", b])
    with pytest.raises(TunelabError, match="--kind"):
        cmd_ab([results, "--kind", "ratio"])
    with pytest.raises(SystemExit) as exited:
        cmd_ab(["--help"])
    assert exited.value.code == 0 and "--metric" in capsys.readouterr().out
