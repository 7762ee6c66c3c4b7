"""``ctpd datasets get`` shows a dataset's statistics, not only its row: the upload's counts (shapes, system and
multi-turn rows, duplicates, identical pairs) and the token lengths a preflight measured per tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

from app.db import datasets as dataset_rows
from tests.app.test_cli_remote import clean_env, ctpd, database_url, requests, server  # noqa: F401 (fixtures)

FORMATS = Path(__file__).resolve().parents[2] / "examples" / "data" / "formats"


def test_datasets_get_prints_the_counts_and_the_measured_token_lengths(server, alice, db, capsys):  # noqa: F811
    flags = ("--url", server, "--key", alice.api_key)
    code, out, _ = ctpd(capsys, "datasets", "upload", str(FORMATS / "conversational_explicit.jsonl"), "--json", *flags)
    dataset = json.loads(out)
    assert code == 0 and dataset["stats"]["counted"]

    code, out, _ = ctpd(capsys, "datasets", "get", dataset["id"], *flags)
    assert code == 0 and dataset["sha256"] in out
    assert "rows:              3 (conversational_explicit 3)" in out
    assert "system turns:      2 rows; multi-turn: 1 rows" in out
    assert "identical pairs:   0" in out and "characters:        prompt: min " in out
    assert "tokens:            none measured yet" in out

    # What a preflight records (worker/preflight.py): per tokenizer, the prompt as that model is fed it.
    measured = {"prompt": {"count": 3, "mean": 54.0, "p50": 54, "p95": 81, "max": 81},
                "chosen": {"count": 3, "mean": 4.0, "p50": 4, "p95": 6, "max": 6},
                "rejected": {"count": 0}, "sampled_pairs": 3}
    dataset_rows.record_token_lengths(db, dataset["id"], "smollm2-135m-instruct", measured)
    code, out, _ = ctpd(capsys, "datasets", "get", dataset["id"], *flags)
    assert ("  smollm2-135m-instruct: prompt: mean 54, p50 54, p95 81, max 81; chosen: mean 4, p50 4, p95 6, max 6; "
            "rejected: none (over 3 sampled pairs)") in out
