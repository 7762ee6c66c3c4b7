"""The quickstart's own scripts: the before → after check (examples/sentiment_before_after.py) and the chat with a
distilled student (examples/chat.py), on the tiny in-test models."""

from __future__ import annotations

import importlib.util
import io
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
BOOK = REPO / ".cache" / "assets" / "botchan.txt"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"examples_{name}", REPO / "examples" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def before_after():
    return _load("sentiment_before_after")


@pytest.fixture(scope="module")
def chat():
    return _load("chat")


def test_the_verdict_follows_the_interval(before_after):
    assert before_after._verdict(0.02, 0.3).startswith("better")
    assert before_after._verdict(-0.3, -0.01).startswith("worse")
    assert before_after._verdict(-0.05, 0.2).startswith("no change")


def test_the_bootstrap_interval_brackets_the_mean_and_excludes_zero_only_for_a_clear_change(before_after):
    before = np.zeros((40, 1))  # [prompts, samples]
    clear = (np.full(40, 0.25) + np.linspace(-0.05, 0.05, 40))[:, None]
    low, high = before_after._interval(clear, before)
    assert 0 < low <= 0.25 <= high
    noisy = np.array([1.0, -1.0] * 20)[:, None]
    low, high = before_after._interval(noisy, before)
    assert low < 0 < high


def test_the_report_says_before_after_and_the_change_in_points(before_after):
    result = {
        "prompts": 64, "samples_per_prompt": 4,
        "positive_share": {"before": 0.41, "after": 0.60, "change_ci95": (0.11, 0.28)},
        "mean_sentiment": {"before": 0.094, "after": 0.306, "change_ci95": (0.14, 0.28)},
        "example": {"prompt": "It was", "before": " dull.", "after": " lovely."},
    }
    text = before_after.report(result)
    assert "positive continuations: 41% -> 60% (+19 points, 95 % interval [+11, +28]): better" in text
    assert "+0.094 -> +0.306" in text


@pytest.mark.skipif(not BOOK.is_file(), reason="botchan.txt is extracted by scripts/setup")
def test_the_same_model_on_both_sides_changes_nothing(before_after, tiny_student_folder, monkeypatch):
    """Common random numbers: the untrained student against itself samples the very same continuations, so the
    change is exactly 0 and the verdict says no change (a check that showed a gain here would be measuring noise)."""
    monkeypatch.setattr("bench.quality.measure.vader_scorer", lambda: (lambda text: (len(text) % 7 - 3) / 3))
    args = before_after.argparse.Namespace(initial=str(tiny_student_folder), prompts=6, samples=2, max_new_tokens=5,
                                           max_prompt_tokens=16, seed=3)
    result = before_after.compare(tiny_student_folder, args)
    share = result["positive_share"]
    assert share["before"] == share["after"]
    assert share["change_ci95"] == (0.0, 0.0)
    assert "no change" in before_after.report(result)


def test_the_check_refuses_a_folder_that_is_not_a_model(before_after, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        before_after.main(["--model", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "no config.json" in capsys.readouterr().err


def test_chat_continues_a_prompt_as_raw_text(chat, tiny_student_folder, capsys):
    assert chat.main(["--model", str(tiny_student_folder), "--prompt", "The master said", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.startswith("The master said")


def test_chat_with_a_template_keeps_the_conversation(chat, tiny_student_folder, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "with-template"
    shutil.copytree(tiny_student_folder, folder)
    template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    (folder / "chat_template.jinja").write_text(template, encoding="utf-8")
    lines = io.StringIO("Hello there\n\nAnd again\n")
    monkeypatch.setattr(chat.sys, "stdin", lines)
    assert chat.main(["--model", str(folder), "--chat", "--max-new-tokens", "3"]) == 0
    assert len(capsys.readouterr().out.splitlines()) >= 2  # one reply per non-empty line


def test_chat_refuses_chat_mode_without_a_template(chat, tiny_student_folder, capsys):
    with pytest.raises(SystemExit):
        chat.main(["--model", str(tiny_student_folder), "--chat", "--prompt", "hi"])
    assert "no chat template" in capsys.readouterr().err
