"""tunelab plan lr: the rule against what tunelab measured, the range test's pick on a known curve,
and a real range test on a tiny model."""

import json
import math
from pathlib import Path

import pytest

from tunelab.cli.main import main
from tunelab.errors import UsageError
from tunelab.planning.lr import MEASURED, pick_from_range_test, rule_rate

DEMO = Path(__file__).resolve().parents[2] / "src" / "tunelab" / "demo_data" / "gsm8k_demo.jsonl"


@pytest.mark.parametrize("method, parameters, batch, best", MEASURED)
def test_the_rule_lands_where_tunelab_measured_the_best_rates(method, parameters, batch, best):
    advice = rule_rate(method, parameters, batch)
    assert best[0] * 0.9 <= advice.rate <= best[1]


def test_the_rule_scales_with_model_size_and_batch():
    small, large = rule_rate("full", 135_000_000, 16), rule_rate("full", 7_000_000_000, 16)
    assert small.rate / large.rate == pytest.approx(math.sqrt(7e9 / 135e6))
    assert rule_rate("lora", 7e9, 64).rate / rule_rate("lora", 7e9, 16).rate == pytest.approx(2.0)
    assert rule_rate("dpo", 7e9, 64).rate == pytest.approx(5e-7) and rule_rate("lora", 7e9, 16).rate == pytest.approx(2e-4)
    with pytest.raises(UsageError, match="--method 'ppo'"):
        rule_rate("ppo", 7e9, 8)


def test_the_range_test_picks_below_the_bottom_of_the_loss():
    rates = [1e-6 * 10 ** (k / 10) for k in range(51)]  # 1e-6 .. 1e-1
    # a loss that falls fastest around 1e-4, bottoms out at 1e-3 and diverges after
    losses = [3 - 2 / (1 + math.exp(-(math.log10(r) + 4) * 3)) + max(0.0, math.log10(r) + 3) ** 2 * 4 for r in rates]
    pick = pick_from_range_test(rates, losses, smoothing=0.0)
    assert pick["bottom"] == pytest.approx(1e-3, rel=0.3) and pick["steepest"] == pytest.approx(1e-4, rel=0.3)
    assert pick["suggested"] == pytest.approx(1e-4, rel=0.3) and not pick["note"]
    with pytest.raises(UsageError, match="at least 5 steps"):
        pick_from_range_test(rates[:3], losses[:3])


def test_a_range_test_on_a_tiny_model(capsys):
    assert main(["plan", "lr", "--model", "tiny-llama", "--batch", "4", "--probe", "--data", str(DEMO), "--probe-steps", "12", "--json"]) == 0
    advice = json.loads(capsys.readouterr().out)
    probe = advice["probe"]
    assert len(probe["rates"]) == 12 and probe["rates"][0] == pytest.approx(1e-7) and probe["rates"][-1] == pytest.approx(1.0)
    assert 1e-7 <= probe["suggested"] <= 1.0 and (Path(probe["run"]) / "metrics.csv").is_file()
    assert main(["plan", "lr", "--model", "tiny-llama", "--probe"]) == 2
    assert "give the training file with --data" in capsys.readouterr().err
