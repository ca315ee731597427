"""tunelab plan approach: example use cases get the approach their factors call for, with the
reasons; bad profiles are refused by field."""

import json

import pytest

from tunelab.cli.main import main
from tunelab.errors import UsageError
from tunelab.planning.approach import Profile, recommend


@pytest.mark.parametrize(
    "profile, approach",
    [
        ({"examples": 20, "task": "complex"}, "prompting"),  # a few demonstrations, hard reasoning
        ({"examples": 0, "knowledge": "changing", "citations": True}, "retrieval"),  # a support bot over docs that change
        ({"examples": 20000, "task": "simple", "format": True, "requests_per_day": 500000}, "fine-tuning"),  # high-volume extraction
        ({"examples": 800, "knowledge": "changing", "format": True}, "fine-tuning + retrieval"),  # a strict format over changing facts
        ({"examples": 30, "format": True}, "prompting"),  # a format wish, but too few examples to train on
        ({"examples": 3000, "budget": "low"}, "prompting"),  # nothing calls for training
    ],
)  # fmt: skip
def test_example_profiles_get_the_approach_their_factors_call_for(profile, approach):
    recommendation = recommend(Profile.from_dict(profile))
    assert recommendation.approach == approach
    assert all(why for _, _, why in recommendation.reasons)
    totals = {a: sum(p for aa, p, _ in recommendation.reasons if aa == a) for a in recommendation.scores}
    assert totals == recommendation.scores  # every point has its reason


def test_latency_limits_count_against_long_prompts_and_retrieval():
    slow = recommend(Profile.from_dict({"examples": 600, "knowledge": "static"}))
    fast = recommend(Profile.from_dict({"examples": 600, "knowledge": "static", "latency_ms": 200}))
    assert fast.scores["fine-tuning"] == slow.scores["fine-tuning"] + 1
    assert fast.scores["retrieval"] == slow.scores["retrieval"] - 1 and fast.scores["prompting"] == slow.scores["prompting"] - 1


@pytest.mark.parametrize(
    "profile, message",
    [
        ({"examples": 10, "volume": 3, "domain": "law"}, "unknown fields domain, volume; the fields are examples, knowledge"),
        ({"knowledge": "static"}, "examples is required"),
        ({"examples": 10, "knowledge": "sometimes"}, "knowledge='sometimes'; choose none, static, changing"),
        ({"examples": -1}, "examples=-1; give a whole number"),
        ({"examples": 10, "format": "yes"}, "format='yes'; give true or false"),
    ],
)  # fmt: skip
def test_a_bad_profile_is_refused_by_field(profile, message):
    with pytest.raises(UsageError, match=message):
        Profile.from_dict(profile, "profile p.yaml")


def test_the_command_reads_a_profile_file_and_flags_override_it(tmp_path, capsys):
    profile = tmp_path / "use-case.yaml"
    profile.write_text("examples: 800\nknowledge: changing\nformat: true\n")
    assert main(["plan", "approach", "--profile", str(profile), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["approach"] == "fine-tuning + retrieval"
    assert main(["plan", "approach", "--profile", str(profile), "--examples", "10", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["approach"] == "retrieval"
    profile.write_text("examples: 800\nlatency: 300\n")
    assert main(["plan", "approach", "--profile", str(profile)]) == 2
    assert "unknown field latency" in capsys.readouterr().err
    assert main(["plan", "approach", "--profile", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
