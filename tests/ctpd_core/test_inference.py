"""The one batched-inference loop: progress after every batch, a stop honoured after any batch (the last too)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from ctpd_core.data import load_pairs
from ctpd_core.encoding import EncodingConfig
from ctpd_core.inference import batched, token_logprobs
from ctpd_core.models import load_causal_lm
from ctpd_core.observe import NullObserver, Progress, Stopped
from ctpd_core.pipeline import prepare

CPU = torch.device("cpu")


class Reports(NullObserver):
    def __init__(self) -> None:
        self.rows: list[Progress] = []

    def progress(self, progress: Progress) -> None:
        self.rows.append(progress)


class StopAt:
    """Says stop once the observer has seen ``reports`` progress reports."""

    def __init__(self, observer: Reports, reports: int) -> None:
        self.observer, self.reports = observer, reports

    def should_stop(self) -> bool:
        return len(self.observer.rows) >= self.reports


def test_batched_keeps_order_and_reports_items_done():
    observer = Reports()
    assert [list(batch) for batch in batched(list(range(7)), 3, stage="reference", observer=observer)] == [
        [0, 1, 2], [3, 4, 5], [6]
    ]
    assert [(row.stage, row.step, row.total) for row in observer.rows] == [
        ("reference", 3, 7), ("reference", 6, 7), ("reference", 7, 7)
    ]


@pytest.mark.parametrize("reports", [1, 2, 3])
def test_batched_stops_after_any_batch_the_last_included(reports):
    observer = Reports()
    seen = []
    with pytest.raises(Stopped) as stopped:
        for batch in batched(list(range(7)), 3, stage="weights", observer=observer, stop=StopAt(observer, reports)):
            seen += batch
    assert len(seen) == min(3 * reports, 7)  # the batch in progress finished; no further one started
    assert (stopped.value.stage, stopped.value.step) == ("weights", min(3 * reports, 7))


@pytest.fixture(scope="module")
def records(tiny_dataset_path, student_tokenizer, teacher_tokenizer):
    pairs = load_pairs(tiny_dataset_path)
    return prepare(pairs[:5], [], student_tokenizer, teacher_tokenizer, EncodingConfig(max_response_tokens=32)).train


def test_token_logprobs_stops_at_its_last_batch(records, tiny_teacher_folder, tmp_path):
    model, tokenizer = load_causal_lm(str(tiny_teacher_folder), cache_dir=tmp_path)
    observer = Reports()
    # 5 pairs, a chosen then a rejected pass, 2 * 2 responses a forward: reports at 4, 5 (chosen), 4, 5 (rejected);
    # the fourth is the last batch's.
    with pytest.raises(Stopped) as stopped:
        token_logprobs(model, records, "teacher", tokenizer.pad_token_id, batch_size=2, device=CPU,
                       precision="fp32", stage="reference", observer=observer, stop=StopAt(observer, 4))
    assert (stopped.value.stage, stopped.value.step) == ("reference:rejected", 5)
    assert [(row.stage, row.step, row.total) for row in observer.rows] == [
        ("reference:chosen", 4, 5), ("reference:chosen", 5, 5), ("reference:rejected", 4, 5),
        ("reference:rejected", 5, 5),
    ]


def test_the_observer_and_publish_modules_are_torch_free():
    code = ("import sys, ctpd_core.observe, ctpd_core.publish; "
            "print(sorted(m for m in ('torch', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_evaluation_does_not_import_the_training_loop():
    code = "import sys, ctpd_core.evaluate; print('ctpd_core.train' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
