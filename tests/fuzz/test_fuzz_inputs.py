"""Fuzzing the command line with inputs nobody wrote a test for (hypothesis, fixed seed).

Every case must end the way a user deserves: a non-zero exit, no traceback, one paragraph that
names the file or the key at fault, and the output folder left as it was. Data files are built
broken on purpose (random bytes, truncated JSON, wrong types, missing fields, empty files, very
long lines, deep nesting, mixed encodings) for every format; config values are set outside their
type or range for every option of every shipped method and task pool.

The "ci" profile (the default here) keeps the whole module to a couple of minutes on 2 cores;
``HYPOTHESIS_PROFILE=long`` runs many more cases.
"""

import json
import os
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from tunelab.cli.main import main
from tunelab.config import compose_config, list_groups, validate_config
from tunelab.config.validate import RANGES
from tunelab.errors import TunelabError

settings.register_profile("ci", max_examples=12, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
settings.register_profile("long", max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

FIELDS = {  # format -> (field options, a valid record); the fields it cannot train without are in REQUIRED
    "alpaca": ([], {"instruction": "Add 2 and 3.", "input": "", "output": "5"}),
    "sharegpt": ([], {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}),
    "openai": ([], {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}),
    "prompt_completion": (["data.prompt_field=question", "data.completion_field=answer"], {"question": "2+3?", "answer": "5"}),
    "preference": ([], {"prompt": "Hi", "chosen": "Hello", "rejected": "Go away"}),
}
REQUIRED = {"alpaca": ["instruction", "output"], "sharegpt": ["conversations"], "openai": ["messages"],
            "prompt_completion": ["question", "answer"], "preference": ["chosen", "rejected"]}  # fmt: skip


def assert_user_error(capsys, code: int, names: list[str]) -> str:
    out, err = capsys.readouterr()
    assert code != 0, f"accepted: {err[-500:]}"
    assert "Traceback" not in err, err
    starts = [i for i, line in enumerate(err.splitlines()) if line.startswith("error: ")]
    assert len(starts) == 1, err
    message = "\n".join(err.splitlines()[starts[0]:])
    assert "\n\n" not in message.strip(), message  # one paragraph (a list of problems may follow on its lines)
    assert any(name in message for name in names), message
    return message


# ----------------------------------------------------------------------------- broken data files
def broken_records(valid: dict, keys: list[str]):
    """Records that cannot train: a required field missing, of the wrong type, empty, or nested deep."""
    wrong_type = st.one_of(st.integers(), st.floats(allow_nan=True), st.booleans(), st.none(), st.lists(st.integers(), max_size=3),
                           st.recursive(st.dictionaries(st.text(max_size=3), st.integers(), max_size=2), lambda c: st.dictionaries(st.text(max_size=3), c, max_size=2), max_leaves=40))  # fmt: skip

    def drop(key):
        return st.builds(lambda extra: {**{k: v for k, v in valid.items() if k != key}, **extra}, st.dictionaries(st.sampled_from(["zz_extra", "meta"]), st.text(max_size=5), max_size=2))

    def retype(key):
        return wrong_type.map(lambda value: {**valid, key: value})

    def empty(key):
        return st.sampled_from(["", "   ", "\n\t"]).map(lambda blank: {**valid, key: blank}) if isinstance(valid[key], str) else retype(key)

    return st.sampled_from(keys).flatmap(lambda key: st.one_of(drop(key), retype(key), empty(key)))


def broken_file(valid: dict, required: list[str]):
    """The bytes of a .jsonl file that cannot train, and what made it so."""
    good_line = json.dumps(valid)
    records = broken_records(valid, required).map(lambda r: (json.dumps(r) + "\n").encode())
    truncated = st.integers(1, max(1, len(good_line) - 1)).map(lambda cut: (good_line[:cut] + "\n").encode())
    random_bytes = st.binary(min_size=1, max_size=300).map(lambda b: b"\x00" + b if b[:1] not in b"{[" else b"\xff" + b)
    blank = st.sampled_from([b"", b"   \n", b"\n\n\n", b"\t \r\n"])
    long_line = st.integers(200_000, 400_000).map(lambda n: b'{"text": "' + b"x" * n + b"\n")
    # deep nesting where a string belongs, or a whole line of nested arrays deeper than the JSON parser recurses
    deep = st.integers(200, 3000).map(lambda depth: (json.dumps({**valid, required[0]: "DEEP"}).replace('"DEEP"', "[" * depth + "]" * depth) + "\n").encode())
    first = required[0]
    latin1 = st.just((json.dumps({**valid, first: "CAFE"}) + "\n").encode().replace(b"CAFE", b"caf\xe9"))  # a latin-1 byte inside UTF-8 text
    body = st.one_of(records, truncated, random_bytes, long_line, deep, latin1)
    # a broken line after some valid ones, or a file with nothing in it
    return st.one_of(blank, st.tuples(st.integers(0, 3), body).map(lambda pair: ((good_line + "\n").encode() * pair[0] + pair[1])))


def _train_argv(tmp_path, fmt: str, path, *extra) -> list[str]:
    return ["train", "modelpool=CausalLMPool/tiny-llama", "fabric=cpu", f"data.path={path}", f"data.format={fmt}", *FIELDS.get(fmt, ([],))[0],
            f"output_dir={tmp_path / 'run'}", "progress_bar=false", *extra]  # fmt: skip


@pytest.mark.parametrize("fmt", sorted(FIELDS))
def test_broken_data_files_never_train_and_never_trace(fmt, tmp_path_factory, capsys):
    method = ["method=lm_finetune/dpo"] if fmt == "preference" else []

    @given(broken_file(FIELDS[fmt][1], REQUIRED[fmt]))
    def check(content: bytes):
        folder = tmp_path_factory.mktemp(fmt)
        path = folder / "train.jsonl"
        path.write_bytes(content)
        capsys.readouterr()
        code = main(_train_argv(folder, fmt, path, *method))
        assert_user_error(capsys, code, [str(path), path.name])
        assert not (folder / "run" / "checkpoints").exists()

    check()


@given(st.binary(min_size=1, max_size=400), st.sampled_from([".txt", ".json", ".csv", ".jsonl"]))
def test_text_and_other_readers_reject_binary_and_bad_encodings(tmp_path_factory, capsys, raw, suffix):
    folder = tmp_path_factory.mktemp("bytes")
    path = folder / f"train{suffix}"
    path.write_bytes(b"\x00\xff" + raw)  # NUL near the start: binary; 0xff: never UTF-8
    fmt = "text" if suffix == ".txt" else "prompt_completion"
    code = main(_train_argv(folder, fmt, path, "data.validate=false"))
    assert_user_error(capsys, code, [str(path)])


@pytest.mark.parametrize("command", [["data", "validate"], ["data", "stats"], ["eval", "perplexity", "--model", "tiny-llama", "--data"]])
def test_data_and_eval_commands_on_broken_files(command, tmp_path_factory, capsys):
    @given(broken_file(FIELDS["prompt_completion"][1], REQUIRED["prompt_completion"]).filter(lambda b: b"\x00" in b or b"\xff" in b or not b.strip() or b.count(b"\n") < 2))
    def check(content: bytes):
        folder = tmp_path_factory.mktemp("cmd")
        path = folder / "data.jsonl"
        path.write_bytes(content)
        capsys.readouterr()
        code = main([*command, str(path)])
        out, err = capsys.readouterr()
        assert "Traceback" not in err, err
        if "error: " not in err:  # a report (validate: exit 1; stats: what it could and could not read) names the file and the lines
            assert path.name in out, out
            assert code == (1 if command[1] == "validate" else 0), out
            return
        assert code != 0 and (str(path) in err or path.name in err), err

    check()


# ----------------------------------------------------------------------------- config values
def leaves(node, path=""):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from leaves(value, f"{path}.{key}" if path else str(key))
    elif not isinstance(node, list):
        yield path, node


def option_cases():
    """(group overrides, key, resolved value) for every scalar option of every shipped method and task pool."""
    cases = {}
    groups = list_groups()
    for method in groups["method"]:
        for taskpool in ("heldout-loss", "gsm8k", "heldout-reward"):
            base = [f"method={method}", f"taskpool={taskpool}"]
            raw = OmegaConf.to_container(compose_config(base), resolve=False)
            for key, value in leaves(raw):
                if isinstance(value, str) and "${" in value:
                    continue  # interpolated: checked where it is set
                cases.setdefault(key, (base, value))
    return sorted((base, key, value) for key, (base, value) in cases.items())


CASES = option_cases()


def wrong_values(key: str, value):
    leaf = key.rsplit(".", 1)[-1]
    if isinstance(value, bool):
        return st.sampled_from(["maybe", "2", "[1]"])
    if isinstance(value, (int, float)):
        bad = st.sampled_from(["not-a-number", "{a: 1}"] + ([] if leaf == "devices" else ["[1,2]"]))  # devices=[1,2]: device indices
        if leaf in RANGES:
            rule = RANGES[leaf][0]
            numbers = st.one_of(st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True, width=32))
            bad = st.one_of(bad, numbers.filter(lambda v: not (v == v and abs(v) != float("inf") and rule(v))))
        return bad
    if isinstance(value, str):
        return st.sampled_from(["bogus-choice-xyz"])
    return None


@pytest.mark.parametrize("base, key, value", CASES, ids=[c[1] for c in CASES])
def test_every_option_refuses_values_of_the_wrong_type_or_range(base, key, value, tmp_path_factory, capsys):
    strategy = wrong_values(key, value)
    if strategy is None:
        pytest.skip(f"{key}={value!r}: no scalar to break")

    @settings(max_examples=3)
    @given(strategy)
    def check(bad):
        text = bad if isinstance(bad, str) else repr(float(bad)) if isinstance(bad, float) else str(bad)
        text = {"nan": "nan", "inf": "inf", "-inf": "-inf"}.get(text, text)
        override = f"{key}={text}"
        try:  # the in-process check decides whether the value is checkable at all (free-form strings are not)
            validate_config(compose_config([*base, override]))
            accepted = True
        except TunelabError:
            accepted = False
        except Exception as err:  # noqa: BLE001 - a crash here is the defect the fuzz test looks for
            pytest.fail(f"{override}: {type(err).__name__}: {err}")
        if accepted:
            assert isinstance(value, str) and isinstance(bad, str), f"{override} was accepted"
            return
        folder = tmp_path_factory.mktemp("opt")
        before = sorted(p.name for p in folder.iterdir())
        capsys.readouterr()
        quiet = [] if key == "progress_bar" else ["progress_bar=false"]
        code = main(["train", *base, f"output_dir={folder / 'run'}", "data.path=never-read.jsonl", *quiet, override])
        assert_user_error(capsys, code, [key, key.rsplit(".", 1)[-1]])
        assert code == 2 and sorted(p.name for p in folder.iterdir()) == before

    random.seed(0)
    check()
