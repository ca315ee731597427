"""tunelab plan data: the ranges by goal, task and base, the measured points they must agree with,
and a file's examples set against them."""

import json
from pathlib import Path

import pytest

from tunelab.cli.main import main
from tunelab.errors import UsageError
from tunelab.planning.data import MEASURED, plan_data

DEMO = Path(__file__).resolve().parents[2] / "src" / "tunelab" / "demo_data" / "gsm8k_demo.jsonl"


def test_harder_tasks_weaker_bases_and_the_task_itself_need_more():
    assert plan_data("format", "simple").plenty <= plan_data("format", "complex").plenty
    assert plan_data("task", "moderate", "weak").fewest > plan_data("task", "moderate", "fair").fewest > plan_data("task", "moderate", "strong").fewest
    assert plan_data("task", "complex").fewest > plan_data("format", "complex").plenty


@pytest.mark.parametrize("goal, task, base, examples, learned", MEASURED)
def test_the_ranges_agree_with_what_tunelab_measured(goal, task, base, examples, learned):
    plan = plan_data(goal, task, base)
    assert (examples >= plan.fewest) is learned


def test_a_file_is_measured_against_the_range(capsys):
    plan = plan_data("format", "complex", "weak", str(DEMO))
    assert plan.have == 200 and plan.verdict().startswith("within the range")
    assert plan_data("task", "complex", "fair", str(DEMO)).verdict().startswith("below the range: 200 of at least 5,000")
    assert main(["plan", "data", "--goal", "task", "--task", "simple", "--base", "strong", "--data", str(DEMO), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["fewest"], report["plenty"], report["have"]) == (100, 500, 200) and report["stats"]["examples"] == 200


def test_bad_input_is_refused_by_name(capsys):
    with pytest.raises(UsageError, match="--goal 'style': choose format, task"):
        plan_data("style")
    assert main(["plan", "data", "--data", "missing.jsonl"]) == 2
    assert "--data missing.jsonl: no such file" in capsys.readouterr().err
