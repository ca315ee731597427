"""`tunelab data validate` as a library: planted defects found at their exact lines, the repaired
copy that validates cleanly, and the check `tunelab train` runs before it loads a model."""

import json
from pathlib import Path

import pytest

from conftest import shared_data

from tunelab.config import DataConfig, compose_config
from tunelab.data.tokenize import tokenize_batch
from tunelab.data.validate import check_before_training, fix_file, repeated_ngrams, validate_file
from tunelab.errors import TunelabError

GSM8K = DataConfig(format="prompt_completion", prompt_field="question", completion_field="answer")
ROWS = [
    {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many clips did she sell?",
     "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips altogether.\n#### 72"},
    {"question": "Weng earns $12 an hour for babysitting. Yesterday, she did 50 minutes of babysitting. How much did she earn?",
     "answer": "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\nWorking 50 minutes, she earned 0.2 x 50 = $<<0.2*50=10>>10.\n#### 10"},
    {"question": "Betty needs $100 for a wallet. She has half of the money. How much more does she need?",
     "answer": "Betty has 100/2 = $<<100/2=50>>50.\nShe needs 100-50 = $<<100-50=50>>50 more.\n#### 50"},
]  # fmt: skip
LOOP = "The answer is 5 because 2 + 3 = 5. " * 8


def line(row: dict) -> bytes:
    return (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")


def planted(tmp_path: Path) -> Path:
    """GSM8K-like records with one defect a line (line numbers are asserted below)."""
    q, a = ROWS[0]["question"], ROWS[0]["answer"]
    lines = [
        line(ROWS[0]),                                                        # 1 fine
        b'{"question": "How many?", "answer": "4"\n',                        # 2 broken JSON
        line({"question": "Cost in euros?", "answer": "It is 4 EUR"}).replace(b"EUR", b"\xff\xfe"),  # 3 invalid bytes
        line({"question": q, "answer": "   "}),                              # 4 empty (whitespace-only) answer
        line({"question": "How many\x07 clips?", "answer": a}),              # 5 control character (BEL)
        line({"question": q, "answer": LOOP}),                               # 6 degenerate loop
        line(ROWS[1]),                                                        # 7 fine
        b'["question", "answer"]\n',                                          # 8 not an object
        line({"question": q, "reply": a}),                                    # 9 no 'answer' field
        b"\n",                                                                # 10 blank: skipped
        line({"question": q, "answer": "Natalia sold \ufffd clips.\n#### 72"}),  # 11 replacement character
        line(ROWS[2]),                                                        # 12 fine
    ]  # fmt: skip
    path = tmp_path / "planted.jsonl"
    path.write_bytes(b"".join(lines))
    return path


def found(report) -> set[tuple[int | None, str, str]]:
    return {(f.line, f.check, f.severity) for f in report.findings}


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_planted_defects_are_found_at_their_lines(tmp_path):
    report = validate_file(planted(tmp_path), GSM8K)
    assert found(report) == {
        (2, "broken_json", "error"),
        (3, "encoding", "error"),
        (3, "replacement_char", "warning"),  # the bad bytes read as U+FFFD
        (4, "empty_field", "error"),
        (5, "control_char", "warning"),
        (6, "repeated_ngram", "warning"),
        (8, "not_an_object", "error"),
        (9, "schema", "error"),
        (11, "replacement_char", "warning"),
    }
    assert report.records == 9 and not report.ok and len(report.errors) == 5
    by_line = {(f.line, f.check): f.message for f in report.findings}
    assert "byte" in by_line[(3, "encoding")]
    assert by_line[(4, "empty_field")].startswith("field 'answer' (the supervised answer) is only whitespace")
    assert "U+0007 at character 9" in by_line[(5, "control_char")] and "question" in by_line[(5, "control_char")]
    assert "U+FFFD" in by_line[(11, "replacement_char")] and "character 14" in by_line[(11, "replacement_char")]
    assert by_line[(9, "schema")].startswith("the record has no field 'answer'")  # no "Data planted.jsonl line 9:" prefix
    assert [f.line for f in report.findings] == sorted(f.line for f in report.findings)


def test_report_renders_counts_then_findings_and_serialises(tmp_path):
    report = validate_file(planted(tmp_path), GSM8K)
    text = report.render(limit=3)
    head, summary = text.splitlines()[:2]
    assert "9 records checked, 5 errors, 4 warnings" in head
    assert summary.strip().startswith("errors:") and "broken_json 1" in summary
    assert "planted.jsonl line 2: [error] broken_json: not valid JSON" in text
    assert "... and 6 more" in text
    data = json.loads(json.dumps(report.to_dict()))
    assert data["ok"] is False and data["errors"] == 5 and data["counts"]["warning"]["replacement_char"] == 2
    assert len(data["findings"]) == 9


def test_a_clean_file_reports_no_problems(tmp_path):
    report = validate_file(write_jsonl(tmp_path / "ok.jsonl", ROWS), GSM8K)
    assert report.ok and report.findings == [] and "No problems found" in report.render()


def test_repeated_ngrams_flag_loops_but_not_templated_reasoning():
    templated = "\n".join(f"Then find the size of doll number {i}: {i * 3} cm * 2/3 = <<{i * 3}*2/3={i * 2}>>{i * 2} cm" for i in range(1, 7))
    assert repeated_ngrams(templated) is None
    assert repeated_ngrams(ROWS[0]["answer"]) is None
    assert "occurs 8 times" in repeated_ngrams(LOOP)
    assert repeated_ngrams("I am sorry. " * 10) is not None


def test_short_answers_with_a_minimum(tmp_path):
    path = write_jsonl(tmp_path / "short.jsonl", [{"question": "2+2?", "answer": "4"}, ROWS[0]])
    assert validate_file(path, GSM8K).ok and not validate_file(path, GSM8K).findings
    report = validate_file(path, GSM8K, min_answer_words=3)
    assert found(report) == {(1, "short_answer", "warning")}


OPENAI = [
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],  # 1 fine
    [{"role": "user", "content": "Hi"}, {"role": "system", "content": "Be brief."}, {"role": "assistant", "content": "Hi."}],  # 2 system late
    [{"role": "user", "content": "Hi"}, {"role": "user", "content": "Hello?"}, {"role": "assistant", "content": "Yes?"}],  # 3 two users
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],  # 4 no assistant
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}],  # 5 ends with user
    [{"role": "assistant", "content": "Welcome."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey."}],  # 6 opens with assistant
    [{"role": "user", "content": "Hi"}, {"role": "robot", "content": "Beep."}],  # 7 unknown role
    [{"role": "user", "content": ""}, {"role": "assistant", "content": "Ask me anything."}],  # 8 empty prompt
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}, {"role": "user", "content": "?"}, {"role": "assistant", "content": "Hi."}],  # 9
]  # fmt: skip


def test_openai_roles_and_turn_order(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in OPENAI])
    report = validate_file(path, DataConfig(format="openai"))
    assert found(report) == {
        (2, "turn_order", "warning"),
        (3, "turn_order", "warning"),
        (4, "no_assistant_turn", "error"),
        (5, "turn_order", "warning"),
        (6, "turn_order", "warning"),
        (7, "schema", "error"),
        (8, "empty_field", "warning"),
        (9, "empty_field", "error"),  # every assistant turn of SFT is supervised, not only the last
    }
    messages = {f.line: f.message for f in report.findings}
    assert messages[2].startswith("messages[1] is a system message after the start")
    assert messages[3].startswith("messages[1] is a second user turn in a row")
    assert "ends with a user turn (messages[2])" in messages[5]
    assert messages[6].startswith("messages[0] opens the conversation with an assistant turn")
    assert "'robot'" in messages[7]
    assert messages[9].startswith("messages[1] (the supervised answer) is empty")


def test_sharegpt_turn_order_and_a_system_prompt_that_does_not_shift_the_names(tmp_path):
    rows = [
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
        {"conversations": [{"from": "gpt", "value": "Hello"}, {"from": "gpt", "value": "Anyone?"}]},
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "human", "value": "Hello?"}]},
    ]
    path = write_jsonl(tmp_path / "share.jsonl", rows)
    report = validate_file(path, DataConfig(format="sharegpt", system_prompt="You are kind."))
    assert found(report) == {(2, "turn_order", "warning"), (3, "turn_order", "warning"), (3, "no_assistant_turn", "error")}
    assert {f.message.split(" ")[0] for f in report.findings if f.check == "turn_order"} == {"conversations[0]", "conversations[1]"}


def test_preference_pairs_warn_on_empty_chosen_and_identical_sides(tmp_path):
    rows = [
        {"prompt": "How do I pick a lock?", "chosen": "", "rejected": "Use a tension wrench and a pick."},
        {"prompt": "Say hi.", "chosen": "Hi.", "rejected": "Hi."},
        {"prompt": "Say hi.", "chosen": "Hi!"},
    ]
    report = validate_file(write_jsonl(tmp_path / "pairs.jsonl", rows), DataConfig(format="preference"))
    # a pair may prefer silence (HH-RLHF's harmless set does): a warning, not an error
    assert found(report) == {(1, "empty_field", "warning"), (2, "identical_pair", "warning"), (3, "schema", "error")}


def test_over_length_under_both_policies_matches_what_training_does(tmp_path, tokenizer):
    rows = [
        ROWS[0],
        {"question": "word " * 200 + "How many?", "answer": "Four."},  # 2 the answer starts after max_length
        {"question": "How many?", "answer": " ".join(f"Step {i}: add {7 * i} to the total." for i in range(30))},  # 3 the answer is cut
    ]
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    truncate = validate_file(path, GSM8K, tokenizer=tokenizer, max_length=128)
    assert found(truncate) == {(2, "overlong", "error"), (3, "overlong", "warning")}
    messages = {f.line: f.message for f in truncate.findings}
    assert "keeps none of its" in messages[2] and "training keeps the first 128 tokens (data.overlong=truncate), losing" in messages[3]
    drop = validate_file(path, GSM8K.__class__(**{**GSM8K.__dict__, "overlong": "drop"}), tokenizer=tokenizer, max_length=128)
    assert found(drop) == {(2, "overlong", "warning"), (3, "overlong", "warning")}
    assert all("training drops it (data.overlong=drop)" in f.message for f in drop.findings)
    # the same verdicts as the tokenizer of training
    status = tokenize_batch({"messages": [[{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}] for r in rows]},
                            tokenizer, 128, "truncate")["status"]  # fmt: skip
    assert status == ["ok", "unsupervised", "truncated"]
    assert not validate_file(path, GSM8K, tokenizer=tokenizer, max_length=4096).findings


def test_text_files_encoding_and_paragraph_lines(tmp_path, tokenizer):
    path = tmp_path / "corpus.txt"
    path.write_bytes(b"First paragraph.\nStill first.\n\nSecond \xe9t\xe9.\n\n\nThird\x0c paragraph.\n")
    report = validate_file(path, DataConfig(format="text"), tokenizer=tokenizer, max_length=4)
    assert {(f.line, f.check) for f in report.findings if f.check != "overlong"} == {(4, "encoding"), (4, "replacement_char"), (7, "control_char")}
    assert {f.line for f in report.findings if f.check == "overlong"} == {1, 4, 7}
    assert "byte 38 of the file" in next(f.message for f in report.findings if f.check == "encoding")


def test_an_unreadable_json_array_is_one_error_and_a_missing_file_raises(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('[{"instruction": "a", "output": "b"},\n {"instruction": ')
    report = validate_file(broken, DataConfig(format="alpaca"))
    assert found(report) == {(None, "unreadable", "error")} and "not valid JSON" in report.errors[0].message
    with pytest.raises(TunelabError, match="does not exist"):
        validate_file(tmp_path / "nowhere.jsonl", GSM8K)


# ---------------------------------------------------------------------------------- fix


def test_fix_writes_a_copy_that_validates_cleanly_and_lists_every_change(tmp_path):
    source = planted(tmp_path)
    before = source.read_bytes()
    out = tmp_path / "fixed.jsonl"
    report = fix_file(source, GSM8K, out)
    assert source.read_bytes() == before  # never edited in place
    assert {f.severity for f in report.findings} == {"info"}
    assert {f.line for f in report.dropped} == {2, 4, 8, 9}
    assert {(f.line, f.check) for f in report.changed} >= {(3, "encoding"), (5, "control_char")}
    assert report.records_in == 11 and report.records_out == 7
    fixed = validate_file(out, GSM8K)
    assert fixed.ok and fixed.records == 7
    rows = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    assert rows[2]["question"] == "How many clips?"  # line 5, BEL removed
    assert "4 records" not in report.render() and "7 of 11 records written" in report.render()
    json.dumps(report.to_dict())


def test_fix_strips_whitespace_normalises_nfc_and_leaves_hh_transcripts_parseable(tmp_path):
    rows = [
        {"chosen": "\n\nHuman: Cafe\u0301?\n\nAssistant: Yes.", "rejected": "\n\nHuman: Cafe\u0301?\n\nAssistant: No."},
        {"chosen": "\n\nHuman: Where does she live?\n\nAssistant: ", "rejected": "\n\nHuman: Where does she live?\n\nAssistant: At 5 Main St."},
        {"prompt": " Say hi. ", "chosen": "Hi.\n", "rejected": "Go away."},
    ]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    report = fix_file(path, DataConfig(format="preference"), tmp_path / "out.jsonl")
    assert {(f.line, f.check) for f in report.findings} == {(1, "unicode_nfc"), (3, "whitespace")}
    assert "prompt, chosen" in next(f.message for f in report.findings if f.check == "whitespace")
    fixed = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()]
    assert fixed[0]["chosen"] == "\n\nHuman: Caf\u00e9?\n\nAssistant: Yes." and fixed[1] == rows[1]  # the empty answer stays a turn
    assert fixed[2] == {"prompt": "Say hi.", "chosen": "Hi.", "rejected": "Go away."}
    assert found(validate_file(tmp_path / "out.jsonl", DataConfig(format="preference"))) == {(2, "empty_field", "warning")}


def test_fix_with_a_tokenizer_drops_answers_truncated_away(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "long.jsonl", [ROWS[0], {"question": "word " * 200 + "How many?", "answer": "Four."}])
    report = fix_file(path, GSM8K, tmp_path / "out.jsonl", tokenizer=tokenizer, max_length=128)
    assert [(f.line, f.check) for f in report.dropped] == [(2, "dropped")] and "overlong" in report.dropped[0].message
    assert validate_file(tmp_path / "out.jsonl", GSM8K, tokenizer=tokenizer, max_length=128).ok


def test_fix_writes_nothing_when_the_input_cannot_be_read_or_is_the_output(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('[{"instruction": ')
    with pytest.raises(TunelabError, match="not valid JSON"):
        fix_file(broken, DataConfig(format="alpaca"), tmp_path / "out.jsonl")
    junk = tmp_path / "junk.jsonl"
    junk.write_text("not json\n[1, 2]\n")
    with pytest.raises(TunelabError, match="nothing was written"):
        fix_file(junk, GSM8K, tmp_path / "out.jsonl")
    assert not (tmp_path / "out.jsonl").exists()
    good = write_jsonl(tmp_path / "good.jsonl", ROWS)
    with pytest.raises(TunelabError, match="never edits data in place"):
        fix_file(good, GSM8K, good)


# ---------------------------------------------------------------------- before training


def test_check_before_training_is_cheap_and_names_the_file_as_the_run_does(tmp_path):
    path = planted(tmp_path)
    findings = check_before_training(DataConfig(**{**GSM8K.__dict__, "path": str(path)}))
    # no control characters, loops or replacement characters: those need validate_file
    assert {(f.line, f.check) for f in findings} == {(2, "broken_json"), (3, "encoding"), (4, "empty_field"), (8, "not_an_object"), (9, "schema")}
    assert findings[0].where == f"'{path}' line 2"
    assert check_before_training(DataConfig(**{**GSM8K.__dict__, "path": str(path), "validate": False})) == []


def test_check_before_training_covers_val_path_sources_and_max_samples(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", ROWS + [{"question": "q", "answer": ""}, {"question": "q"}])
    val = write_jsonl(tmp_path / "val.jsonl", [{"question": "q", "answer": ""}])
    cfg = DataConfig(**{**GSM8K.__dict__, "path": str(train), "val_path": str(val), "max_samples": 3})
    # past max_samples only what stops the reader counts: the schema error, not the empty answer
    assert [(f.where, f.check) for f in check_before_training(cfg)] == [(f"'{train}' line 5", "schema"), (f"'{val}' line 1", "empty_field")]
    chats = write_jsonl(tmp_path / "chats.jsonl", [{"messages": OPENAI[3]}])
    mixture = DataConfig(sources=[{"path": str(train), "format": "prompt_completion", "prompt_field": "question", "completion_field": "answer"},
                                  {"path": str(chats), "format": "openai"}])  # fmt: skip
    assert [(f.line, f.check) for f in check_before_training(mixture)] == [(4, "empty_field"), (5, "schema"), (1, "no_assistant_turn")]


def test_check_before_training_of_text_reads_text_files_for_encoding_only(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(b"fine\n\nalso fine\x07\n\n" + "caf\u00e9".encode("latin-1") + b"\n")
    assert [(f.line, f.check) for f in check_before_training(DataConfig(path=str(corpus), format="text"))] == [(5, "encoding")]
    docs = tmp_path / "docs.jsonl"
    docs.write_bytes(b'{"text": "a"}\n{"body": "b"}\n{"text": ""}\n{"text": \n')
    findings = check_before_training(DataConfig(path=str(docs), format="text"))
    assert [(f.line, f.check, f.severity) for f in findings] == [(2, "schema", "error"), (3, "empty_field", "warning"), (4, "broken_json", "error")]
    assert findings[0].message.startswith("no text field 'text' (data.text_field)")
    assert check_before_training(DataConfig(path=str(docs), format="text", max_samples=1)) == []


def test_a_field_missing_from_every_record_is_left_to_the_method_and_shared_messages_are_grouped(tmp_path):
    from tunelab.data.validate import training_refusal

    wrong_field = write_jsonl(tmp_path / "wrong.jsonl", [{"question": r["question"], "reply": r["answer"]} for r in ROWS])
    # a format or field choice, not a defect of the data: the method's builder words it (e.g. pretraining asks for text)
    assert check_before_training(DataConfig(**{**GSM8K.__dict__, "path": str(wrong_field)})) == []
    rows = ROWS[:1] + [{"question": "q", "reply": "a"}] * 7 + ROWS[1:]
    cfg = DataConfig(**{**GSM8K.__dict__, "path": str(write_jsonl(tmp_path / "some.jsonl", rows))})
    message = str(training_refusal(check_before_training(cfg), cfg))
    assert "7 problems" in message
    assert f"'{cfg.path}' lines 2, 3, 4, 5, 6 and 2 more (7 records): the record has no field 'answer'" in message


def _train_overrides(out: Path, data: Path, *extra: str) -> list[str]:
    return ["modelpool=CausalLMPool/tiny-llama", f"data.path={data}", "data.prompt_field=question", "data.completion_field=answer",
            f"output_dir={out}", "progress_bar=false", "fabric.precision=32-true", *extra]  # fmt: skip


class TokenizerLoaded(Exception):
    pass


@pytest.fixture
def no_model_loads(monkeypatch):
    from tunelab.models.pool import CausalLMPool

    def refuse(self, *args, **kwargs):
        raise TokenizerLoaded

    monkeypatch.setattr(CausalLMPool, "load_tokenizer", refuse)
    monkeypatch.setattr(CausalLMPool, "load_model", refuse)


def test_train_stops_before_loading_a_model_and_lists_the_lines(tmp_path, no_model_loads):
    from tunelab.engine import train

    data = planted(tmp_path)
    with pytest.raises(TunelabError) as info:
        train(compose_config(_train_overrides(tmp_path / "run", data)))
    message = str(info.value)
    assert "5 problems" in message
    assert f"'{data}' line 2 is not valid JSON" in message  # as the training reader words it
    for where in ("line 3: byte", "line 4: field 'answer' (the supervised answer)", "line 8 is a JSON list", "line 9: the record has no field"):
        assert where in message
    assert f"tunelab data validate {data} --format prompt_completion --prompt-field question --completion-field answer --fix" in message
    assert "data.validate=false" in message
    assert not (tmp_path / "run/run.json").exists()


def test_train_with_validate_false_skips_the_check(tmp_path, no_model_loads):
    from tunelab.engine import train

    with pytest.raises(TokenizerLoaded):  # past the check: the run goes on to load the tokenizer
        train(compose_config(_train_overrides(tmp_path / "run", planted(tmp_path), "data.validate=false")))


def test_train_logs_warnings_and_goes_on(tmp_path, no_model_loads, caplog):
    from tunelab.engine import train

    data = write_jsonl(tmp_path / "warn.jsonl", ROWS + [{"question": "", "answer": "It is 4."}])
    with caplog.at_level("WARNING", logger="tunelab.engine.trainer"), pytest.raises(TokenizerLoaded):
        train(compose_config(_train_overrides(tmp_path / "run", data)))
    assert "Data check: 1 warning (empty_field 1)" in caplog.text and f"'{data}' line 4: field 'question'" in caplog.text


# ---------------------------------------------------------------------------- real data


@pytest.mark.parametrize(
    "parts, options",
    [
        (("gsm8k", "train.jsonl"), {"prompt_field": "question", "completion_field": "answer"}),
        (("alpaca", "alpaca_cleaned_1000.json"), {"format": "alpaca"}),
        (("sharegpt", "conversations.json"), {"format": "sharegpt"}),
        (("hh-rlhf", "harmless_pairs.jsonl"), {"format": "preference"}),
        (("tinyshakespeare", "input.txt"), {"format": "text"}),
    ],
)
def test_the_shared_data_validates_without_errors(parts, options):
    path = shared_data(*parts)
    report = validate_file(path, DataConfig(**options))
    assert report.ok, report.render()
    assert not [f for f in check_before_training(DataConfig(path=str(path), **options)) if f.severity == "error"]


def test_shared_sharegpt_with_the_tokenizer(tokenizer):
    report = validate_file(shared_data("sharegpt", "conversations.json"), DataConfig(format="sharegpt"), tokenizer=tokenizer, max_length=2048)
    assert report.ok and report.checked_length and report.records == 500


@pytest.mark.parametrize("parts, fmt", [(("hh-rlhf", "harmless_pairs.jsonl"), "preference"), (("alpaca", "alpaca_cleaned_1000.json"), "alpaca")])
def test_fixing_the_shared_data_drops_nothing_and_changes_no_finding(tmp_path, parts, fmt):
    path, cfg = shared_data(*parts), DataConfig(format=fmt)
    report = fix_file(path, cfg, tmp_path / "fixed.jsonl")
    assert not report.dropped and report.records_out == report.records_in
    before, after = validate_file(path, cfg), validate_file(tmp_path / "fixed.jsonl", cfg)
    assert [(f.check, f.message) for f in after.findings] == [(f.check, f.message) for f in before.findings]
