"""Data files -> records -> conversations or texts (tunelab.data.readers / formats)."""

import json

import pytest

from tunelab.config import DataConfig
from tunelab.data import Record, read_records, to_example
from tunelab.errors import TunelabError

ROWS = [
    {"prompt": "What is 2+2?", "completion": "Four."},
    {"prompt": "Name a colour.", "completion": "Blue."},
]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ---------------------------------------------------------------- readers


def test_jsonl_reads_every_line_and_skips_blank_lines(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1]) + "\n", encoding="utf-8")
    records = read_records(path)
    assert [r.fields for r in records] == ROWS
    # The location counts physical lines, blank ones included.
    assert [r.where for r in records] == ["train.jsonl line 1", "train.jsonl line 3"]


def test_json_array_and_wrapped_array(tmp_path):
    array = tmp_path / "data.json"
    array.write_text(json.dumps(ROWS), encoding="utf-8")
    records = read_records(array)
    assert [r.fields for r in records] == ROWS
    assert records[1].where == "data.json item 1"

    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"data": ROWS, "version": 2}), encoding="utf-8")
    assert [r.fields for r in read_records(wrapped)] == ROWS


def test_csv_rows_count_from_the_header_line(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text('prompt,completion\nWhat is 2+2?,Four.\n"Name a colour.",Blue.\n', encoding="utf-8")
    records = read_records(path)
    assert [r.fields for r in records] == ROWS
    assert [r.where for r in records] == ["data.csv row 2", "data.csv row 3"]


def test_parquet(tmp_path):
    datasets = pytest.importorskip("datasets")
    path = tmp_path / "data.parquet"
    datasets.Dataset.from_list(ROWS).to_parquet(str(path))
    records = read_records(path)
    assert [r.fields for r in records] == ROWS
    assert records[0].where == "data.parquet row 0"


def test_txt_is_one_record_per_paragraph(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("First paragraph\nstill first.\n\n\n\nSecond one.\n", encoding="utf-8")
    records = read_records(path, text_field="body")
    assert [r.fields for r in records] == [{"body": "First paragraph\nstill first."}, {"body": "Second one."}]


def test_csv_numeric_looking_column_is_still_text(tmp_path):
    path = tmp_path / "numbers.csv"
    path.write_text("prompt,completion\nWhat is 2+2?,4\nWhat is 3+4?,7\n", encoding="utf-8")
    examples = [to_example(r, DataConfig()) for r in read_records(path)]
    assert examples[0]["messages"][-1] == {"role": "assistant", "content": "4"}


def test_malformed_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(ROWS[0]) + '\n{"prompt": "unterminated\n', encoding="utf-8")
    with pytest.raises(TunelabError) as info:
        read_records(path)
    message = str(info.value)
    assert "broken.jsonl" in message
    assert "line 2" in message
    assert "not valid JSON" in message


def test_jsonl_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "list.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n[1, 2]\n", encoding="utf-8")
    with pytest.raises(TunelabError, match=r"line 2 is a JSON list, not an object"):
        read_records(path)


def test_malformed_json_array_names_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[{"prompt": "a"},\n{"prompt": }]', encoding="utf-8")
    with pytest.raises(TunelabError) as info:
        read_records(path)
    assert "broken.json" in str(info.value)
    assert "line 2" in str(info.value)


def test_unknown_extension(tmp_path):
    path = tmp_path / "data.xlsx"
    path.write_text("whatever", encoding="utf-8")
    with pytest.raises(TunelabError) as info:
        read_records(path)
    message = str(info.value)
    assert "'.xlsx'" in message
    assert ".jsonl" in message and ".parquet" in message


# ---------------------------------------------------------------- formats


def _example(fields, **cfg):
    return to_example(Record(fields, "test.jsonl line 1"), DataConfig(**cfg))


def test_alpaca_with_input_system_and_history():
    example = _example(
        {
            "instruction": "Translate to French.",
            "input": "Good morning",
            "output": "Bonjour",
            "system": "You translate.",
            "history": [["Hi", "Hello!"], ["How are you?", "Fine."]],
        },
        format="alpaca",
    )
    assert example == {
        "messages": [
            {"role": "system", "content": "You translate."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "How are you?"},
            {"role": "assistant", "content": "Fine."},
            {"role": "user", "content": "Translate to French.\n\nGood morning"},
            {"role": "assistant", "content": "Bonjour"},
        ]
    }


def test_alpaca_empty_input_and_config_system_prompt():
    example = _example(
        {"instruction": "Say hi.", "input": "", "output": "Hi!"}, format="alpaca", system_prompt="Be brief."
    )
    assert example["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Say hi."},
        {"role": "assistant", "content": "Hi!"},
    ]


def test_alpaca_record_system_wins_over_config_system_prompt():
    example = _example(
        {"instruction": "Q", "output": "A", "system": "From record."}, format="alpaca", system_prompt="From config."
    )
    assert example["messages"][0] == {"role": "system", "content": "From record."}
    assert sum(m["role"] == "system" for m in example["messages"]) == 1


def test_alpaca_bad_history():
    with pytest.raises(TunelabError, match=r"history"):
        _example({"instruction": "Q", "output": "A", "history": [["only one"]]}, format="alpaca")


def test_sharegpt_from_value_with_system_turn():
    example = _example(
        {
            "conversations": [
                {"from": "system", "value": "You are terse."},
                {"from": "human", "value": "Hi"},
                {"from": "gpt", "value": "Hello."},
                {"from": "human", "value": "Bye"},
                {"from": "gpt", "value": "Bye."},
            ]
        },
        format="sharegpt",
        system_prompt="ignored because the record has its own",
    )
    assert example["messages"] == [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Bye."},
    ]


def test_sharegpt_custom_messages_field_and_system_prompt():
    example = _example(
        {"turns": [{"from": "user", "value": "Q"}, {"from": "bot", "value": "A"}]},
        format="sharegpt",
        messages_field="turns",
        system_prompt="Sys",
    )
    assert example["messages"] == [
        {"role": "system", "content": "Sys"},
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "A"},
    ]


def test_sharegpt_unknown_role():
    with pytest.raises(TunelabError) as info:
        _example(
            {"conversations": [{"from": "human", "value": "Hi"}, {"from": "robot", "value": "Beep"}]},
            format="sharegpt",
        )
    message = str(info.value)
    assert "test.jsonl line 1" in message
    assert "conversations[1]" in message
    assert "'robot'" in message
    assert "gpt" in message and "human" in message  # the valid roles are listed


def test_sharegpt_turn_missing_value():
    with pytest.raises(TunelabError, match=r"conversations\[0\] must be an object with 'from' and 'value'"):
        _example({"conversations": [{"from": "human", "text": "Hi"}]}, format="sharegpt")


def test_openai_messages():
    messages = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "U"},
        {"role": "assistant", "content": "A"},
    ]
    assert _example({"messages": messages}, format="openai") == {"messages": messages}


def test_openai_unknown_role():
    with pytest.raises(TunelabError, match=r"role='tool'"):
        _example({"messages": [{"role": "tool", "content": "x"}]}, format="openai")


def test_prompt_completion_custom_fields():
    example = _example(
        {"question": "2+2?", "answer": "4", "id": 7},
        format="prompt_completion",
        prompt_field="question",
        completion_field="answer",
    )
    assert example == {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}


def test_text_format_custom_field():
    assert _example({"body": "Once upon a time."}, format="text", text_field="body") == {"text": "Once upon a time."}


def test_missing_field_names_location_field_and_option(tmp_path):
    path = _write_jsonl(tmp_path / "qa.jsonl", [{"question": "a", "answer": "b"}, {"question": "c", "answr": "d"}])
    cfg = DataConfig(prompt_field="question", completion_field="answer")
    records = read_records(path)
    assert to_example(records[0], cfg)["messages"][1]["content"] == "b"
    with pytest.raises(TunelabError) as info:
        to_example(records[1], cfg)
    message = str(info.value)
    assert "qa.jsonl line 2" in message
    assert "'answer'" in message
    assert "data.completion_field" in message
    assert "answr" in message  # the fields that are there are listed


def test_missing_default_prompt_field_names_option():
    with pytest.raises(TunelabError) as info:
        _example({"instruction": "x", "output": "y"})
    assert "'prompt'" in str(info.value) and "data.prompt_field" in str(info.value)


def test_field_of_wrong_type():
    with pytest.raises(TunelabError, match=r"field 'completion' must be a str, got list"):
        _example({"prompt": "p", "completion": ["a", "b"]})


def test_json_nested_deeper_than_the_parser_recurses_is_a_broken_line_not_a_crash(tmp_path):
    # Found by tests/fuzz: json.loads raised RecursionError, a traceback in every command.
    from tunelab.data.files import scan_file
    from tunelab.data.readers import read_records

    path = tmp_path / "deep.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": ' + "[" * 5000 + "]" * 5000 + ', "completion": "b"}\n')
    with pytest.raises(TunelabError, match=r"deep.jsonl' line 2 is not valid JSON \(nested deeper"):
        read_records(path)
    findings = scan_file(path).findings
    assert [(f.line, f.check) for f in findings] == [(2, "broken_json")] and "nested deeper" in findings[0].message


def test_a_csv_field_past_the_csv_modules_limit_names_the_file_and_line(tmp_path):
    # Before: csv.Error ("field larger than field limit") escaped as an unexpected failure without the file.
    path = tmp_path / "long.csv"
    path.write_text('prompt,completion\nshort,ok\n"' + "x" * 200_000 + '",ok\n')
    with pytest.raises(TunelabError, match=r"long.csv' line 3 cannot be read as CSV \(field larger than field limit"):
        read_records(path)
