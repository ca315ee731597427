"""The demo's screen: numbers before and after, and a looping answer called a loop."""

from pathlib import Path

from tunelab.demo import AnswerScores, DemoReport


def report(after: AnswerScores) -> str:
    before = AnswerScores(40, 7, 0, 0, 17, "Betty has half of the money she needs...", False, 50.0)
    return DemoReport(
        "SmolLM2-135M-Instruct", 200.0, 60, 650.0, 380.0, 1.4046, 0.8123, "How much more money does Betty need?",
        "100 / 2 = 50 ... #### 5", before, after, 256, Path("runs/demo/checkpoints/step-000060"), Path("runs/demo/metrics.csv"), None,
    ).render()  # fmt: skip


def test_the_screen_shows_format_share_and_accuracy_before_and_after():
    text = report(AnswerScores(40, 36, 3, 1, 0, "Betty has 100 / 2 = $<<100/2=50>>50.\n#### 5", False, 45.0))
    format_row = next(line for line in text.splitlines() if "answers in GSM8K's format" in line)
    right_row = next(line for line in text.splitlines() if "right final number" in line)
    assert format_row.split()[-4:] == ["7/40", "(18%)", "36/40", "(90%)"] and right_row.split()[-4:] == ["0/40", "(0%)", "3/40", "(8%)"]
    assert "1.4046" in text and "0.8123" in text
    assert "answer after:  Betty has 100 / 2" in text and "loop" not in text.split("answer after:")[1].split("checkpoint")[0]


def test_a_looping_answer_is_called_a_loop_not_presented_as_the_result():
    text = report(AnswerScores(40, 16, 0, 16, 8, "Betty has $100 - $15 =", True, 45.0))
    after = text.split("answer after:")[1]
    assert "it loops" in after and "This is not a usable answer" in after
    assert "The tuned model still loops on 16/40 (40%)" in text
