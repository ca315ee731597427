"""Loss-mask audit (tunelab.data.audit): the checks fire on broken chat templates, pass on the real
one, and the pages show supervised tokens with the record's text escaped."""

import copy
import dataclasses
import html
import json
import re

import pytest

from conftest import shared_data
from tunelab.config.schema import DataConfig
from tunelab.data.audit import CHECKS, audit_file
from tunelab.errors import TunelabError

GSM8K = DataConfig(format="prompt_completion", prompt_field="question", completion_field="answer")
OPENAI = DataConfig(format="openai")
ROWS = [
    {"question": "What is 2+2?", "answer": "2+2 = 4.\n#### 4"},
    {"question": "Tom has 3 apples and eats one. How many are left?", "answer": "3 - 1 = 2 apples are left.\n#### 2"},
    {"question": "Double 21.", "answer": "21 * 2 = 42.\n#### 42"},
]
TWO_TURNS = {"messages": [
    {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye."},
]}  # fmt: skip

# ChatML, except that the generation prompt opens a "model" turn while training renders "assistant":
# the model is trained on one prompt and asked with another.
MISMATCHED_PROMPT = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>model\n{% endif %}"
)
# ChatML with each turn's <|im_end|> written at the start of the next turn: the end-of-turn token is
# outside what assistant_spans supervises, and the last reply has none at all.
EOT_IN_NEXT_TURN = (
    "{% for m in messages %}{% if not loop.first %}<|im_end|>\n{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<|im_end|>\n<|im_start|>assistant\n{% endif %}"
)


def write_jsonl(path, rows: list, extra_lines: tuple[str, ...] = ()) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows) + "".join(line + "\n" for line in extra_lines))
    return str(path)


def with_template(tokenizer, template: str):
    broken = copy.deepcopy(tokenizer)
    broken.chat_template = template
    return broken


def test_real_template_passes_on_gsm8k_like_data(tmp_path, tokenizer):
    report = audit_file(write_jsonl(tmp_path / "math.jsonl", ROWS), GSM8K, tokenizer, n=2)
    assert report.ok and report.examples == 3 and not report.findings
    assert report.counts == {check: 0 for check in CHECKS}
    assert report.end_of_turn == {"<|im_end|>": 3}  # the token found after every reply
    assert len(report.shown) == 2
    for example in report.shown:
        supervised = "".join(p.text for p in example.pieces if p.supervised)
        row = ROWS[example.line - 1]
        assert supervised == row["answer"] + "<|im_end|>"  # the reply and its end-of-turn token, nothing else
        assert example.supervised == len([p for p in example.pieces if p.supervised])


def test_real_template_passes_on_shared_gsm8k(tmp_path, tokenizer):
    lines = shared_data("gsm8k", "train.jsonl").read_text().splitlines()[:150]
    path = tmp_path / "gsm8k-head.jsonl"
    path.write_text("\n".join(lines) + "\n")
    report = audit_file(path, GSM8K, tokenizer, n=3, seed=1, max_length=1024)
    assert report.ok and not report.findings and report.examples == 150
    assert report.end_of_turn == {"<|im_end|>": 150}


def test_prompt_mismatch_fires_on_every_example(tmp_path, tokenizer):
    broken = with_template(tokenizer, MISMATCHED_PROMPT)
    report = audit_file(write_jsonl(tmp_path / "math.jsonl", ROWS), GSM8K, broken, n=1)
    assert not report.ok
    assert report.counts["prompt_mismatch"] == 3
    mismatches = [f for f in report.findings if f.check == "prompt_mismatch"]
    assert [f.line for f in mismatches] == [1, 2, 3] and all(f.severity == "error" for f in mismatches)
    message = mismatches[0].message
    assert "training prompt differs from inference prompt" in message
    assert "'assistant\\n" in message and "'model\\n'" in message  # the first differing characters, both sides


def test_end_of_turn_outside_the_supervised_span_fires(tmp_path, tokenizer):
    broken = with_template(tokenizer, EOT_IN_NEXT_TURN)
    one_turn = {"messages": TWO_TURNS["messages"][:2]}
    path = write_jsonl(tmp_path / "chat.jsonl", [one_turn, TWO_TURNS])
    report = audit_file(path, OPENAI, broken, lines=[2])
    flagged = [f for f in report.findings if f.check == "eot_unsupervised"]
    assert [f.line for f in flagged] == [1, 2] and report.counts["eot_unsupervised"] == 2
    assert "nothing follows reply 1" in flagged[0].message
    assert "'<|im_end|>' after reply 1 is not supervised" in flagged[1].message
    assert "nothing follows reply 2" in flagged[1].message
    assert "never learns to end its turn" in flagged[1].message
    # The page shows it: the <|im_end|> after the first reply is context, not a target.
    (example,) = report.shown
    assert [p.supervised for p in example.pieces if p.text == "<|im_end|>"] == [False, False, False]
    assert example.findings == flagged[1:]


def test_no_supervised_tokens_is_an_error_on_its_line(tmp_path, tokenizer):
    rows = [TWO_TURNS, {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Anyone there?"}]}]
    report = audit_file(write_jsonl(tmp_path / "chat.jsonl", rows), OPENAI, tokenizer)
    (finding,) = report.findings
    assert (finding.line, finding.check, finding.severity) == (2, "no_supervised_tokens", "error")


def test_truncation_that_cuts_supervised_tokens_warns(tmp_path, tokenizer):
    rows = [{"question": "Short?", "answer": "Yes."}, {"question": "Long?", "answer": "step " * 60 + "\n#### 1"}]
    path = write_jsonl(tmp_path / "math.jsonl", rows)
    report = audit_file(path, GSM8K, tokenizer, max_length=48)
    (finding,) = report.findings
    assert (finding.line, finding.check, finding.severity) == (2, "truncated_supervision", "warning")
    assert "max_length=48" in finding.message and "truncation cuts" in finding.message
    assert report.ok  # a warning, not an error
    dropped = audit_file(path, dataclasses.replace(GSM8K, overlong="drop"), tokenizer, max_length=48)
    assert "data.overlong=drop drops it" in dropped.findings[0].message


def test_unreadable_and_schema_findings_are_kept_and_counted(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "math.jsonl", ROWS, extra_lines=("{broken", '{"question": "no answer"}'))
    report = audit_file(path, GSM8K, tokenizer)
    assert (report.records, report.unreadable, report.schema_failures, report.examples) == (4, 1, 1, 3)
    assert {(f.line, f.check) for f in report.findings} == {(4, "broken_json"), (5, "schema")}
    assert report.counts["broken_json"] == 1 and report.counts["schema"] == 1


def test_selection_by_lines_and_by_seed(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "math.jsonl", ROWS, extra_lines=("{broken",))
    assert [e.line for e in audit_file(path, GSM8K, tokenizer, lines=[3, 1]).shown] == [1, 3]  # file order
    draws = [[e.line for e in audit_file(path, GSM8K, tokenizer, n=2, seed=7).shown] for _ in range(2)]
    assert draws[0] == draws[1] and len(draws[0]) == 2
    assert len(audit_file(path, GSM8K, tokenizer, n=50).shown) == 3
    with pytest.raises(TunelabError, match=r"line/item 4.*broken_json"):
        audit_file(path, GSM8K, tokenizer, lines=[4])
    with pytest.raises(TunelabError, match="line/item 9; the examples are at 1..3"):
        audit_file(path, GSM8K, tokenizer, lines=[9])


def test_json_array_items_are_selected_by_item_number(tmp_path, tokenizer):
    path = tmp_path / "chat.json"
    path.write_text(json.dumps([{"conversations": [{"from": "human", "value": f"Q{i}"}, {"from": "gpt", "value": f"A{i}"}]} for i in range(4)]))
    report = audit_file(path, DataConfig(format="sharegpt"), tokenizer, lines=[0, 2])
    assert [e.where for e in report.shown] == ["chat.json item 0", "chat.json item 2"]


def test_preference_pairs_supervise_only_the_differing_replies(tmp_path, tokenizer):
    pairs = [{"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "No."}]
    report = audit_file(write_jsonl(tmp_path / "pairs.jsonl", pairs), DataConfig(format="preference"), tokenizer)
    assert report.ok and report.examples == 2
    assert [(e.side, "".join(p.text for p in e.pieces if p.supervised)) for e in report.shown] == [
        ("chosen", "Blue.<|im_end|>"), ("rejected", "No.<|im_end|>"),
    ]  # fmt: skip


def test_text_format_is_refused(tmp_path, tokenizer):
    path = tmp_path / "corpus.txt"
    path.write_text("Some text.\n")
    with pytest.raises(TunelabError, match="data.format=text has no assistant replies"):
        audit_file(path, DataConfig(format="text"), tokenizer)


def test_terminal_marks_supervised_spans(tmp_path, tokenizer):
    report = audit_file(write_jsonl(tmp_path / "math.jsonl", ROWS[:1]), GSM8K, tokenizer)
    plain = report.render_terminal(color=False)
    assert "\x1b[" not in plain
    assert "<|im_start|>assistant\n⟦2+2 = 4.\n#### 4<|im_end|>⟧\n" in plain
    assert "What is 2+2?<|im_end|>" in plain and "⟦What" not in plain
    colored = report.render_terminal(color=True)
    assert "\x1b[30;42m2+2 = 4.↵\x1b[0m" in colored  # supervised text on green, its newline made visible
    assert "\x1b[1;30;42m<|im_end|>\x1b[0m" in colored  # a supervised special token
    assert "eot_unsupervised 0" in colored and "math.jsonl line 1" in colored


def test_html_is_self_contained_and_escapes_the_records(tmp_path, tokenizer):
    rows = [{"question": "Is <script>alert('x')</script> & <b>bold</b> safe?", "answer": "No: </pre><script>bad()</script>"}]
    report = audit_file(write_jsonl(tmp_path / "evil.jsonl", rows), GSM8K, with_template(tokenizer, EOT_IN_NEXT_TURN))
    page = report.render_html()
    assert "<script" not in page.lower() and "<b>" not in page
    assert page.count("</pre>") == len(report.shown) == 1  # the reply's </pre> is text, not markup
    shown = html.unescape(re.sub(r"<[^>]+>", "", page))
    assert "Is <script>alert('x')</script> & <b>bold</b> safe?" in shown
    assert "No: </pre><script>bad()</script>" in shown
    assert "<style>" in page and "http" not in page  # inline CSS, nothing fetched
    assert "Legend" in page and 'class="s"' in page  # legend and supervised tokens
    assert "evil.jsonl line 1" in page and "line 1 · " in page and "supervised" in page
    assert "eot_unsupervised" in page and "nothing follows reply 1" in page  # the example's finding


def test_report_to_dict_is_json(tmp_path, tokenizer):
    report = audit_file(write_jsonl(tmp_path / "math.jsonl", ROWS), GSM8K, tokenizer, n=1)
    data = json.loads(json.dumps(report.to_dict()))
    assert data["ok"] is True and data["examples"] == 3 and data["counts"]["eot_unsupervised"] == 0
    (example,) = data["shown"]
    assert "".join(text for text, _, supervised, _ in example["pieces"] if supervised).endswith("<|im_end|>")


def test_a_template_that_refuses_a_conversation_is_a_finding(tmp_path, tokenizer):
    refuses_system = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    rows = [TWO_TURNS, {"messages": [{"role": "system", "content": "Be brief."}] + TWO_TURNS["messages"]}]
    report = audit_file(write_jsonl(tmp_path / "chat.jsonl", rows), OPENAI, with_template(tokenizer, refuses_system), lines=[2])
    (finding,) = report.findings
    assert (finding.line, finding.check) == (2, "chat_template") and "System role not supported" in finding.message
    assert report.shown[0].pieces == [] and "not tokenized" in report.render_terminal(color=False)
