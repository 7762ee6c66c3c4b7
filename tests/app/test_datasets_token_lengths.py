"""``record_token_lengths``: the preflight's measured token lengths merged into ``datasets.stats``, on both
backends, concurrently."""

from __future__ import annotations

import threading

import pytest

from app.db import datasets as dataset_rows
from app.db.engine import Database


def _dataset(db: Database, stats: dict | None) -> str:
    row = dataset_rows.create_dataset(
        db, tenant="acme", filename="pairs.jsonl", format="jsonl", num_rows=3, sha256="0" * 64, size_bytes=10,
        path="/nowhere/pairs.jsonl", stats=stats,
    )
    return row.id


def _stats(db: Database, dataset_id: str) -> dict | None:
    row = dataset_rows.get_dataset(db, dataset_id)
    assert row is not None
    return row.stats


def test_a_dataset_without_stats_gets_token_lengths_alone(db: Database):
    dataset_id = _dataset(db, None)  # as stored before 0007_dataset_stats
    dataset_rows.record_token_lengths(db, dataset_id, "smollm2-135m-instruct", {"prompt": {"max": 12}})
    assert _stats(db, dataset_id) == {"token_lengths": {"smollm2-135m-instruct": {"prompt": {"max": 12}}}}


def test_lengths_merge_per_tokenizer_and_keep_the_upload_counts(db: Database):
    dataset_id = _dataset(db, {"rows": 3, "duplicate_rows": 1})
    dataset_rows.record_token_lengths(db, dataset_id, "gemma-3-270m", {"chosen": {"max": 40}})
    dataset_rows.record_token_lengths(db, dataset_id, "smollm2-135m-instruct", {"chosen": {"max": 50}})
    dataset_rows.record_token_lengths(db, dataset_id, "gemma-3-270m", {"chosen": {"max": 41}})  # replaced
    assert _stats(db, dataset_id) == {
        "rows": 3, "duplicate_rows": 1,
        "token_lengths": {"gemma-3-270m": {"chosen": {"max": 41}}, "smollm2-135m-instruct": {"chosen": {"max": 50}}},
    }


def test_concurrent_recordings_of_different_tokenizers_all_land(db: Database):
    """Without the row lock, two read-modify-writes interleave and the later commit drops the other's tokenizer."""
    dataset_id = _dataset(db, {"rows": 3})
    tokenizers = [f"tokenizer-{index}" for index in range(6)]
    barrier = threading.Barrier(len(tokenizers))
    failures: list[BaseException] = []

    def record(name: str) -> None:
        try:
            barrier.wait()
            dataset_rows.record_token_lengths(db, dataset_id, name, {"prompt": {"max": len(name)}})
        except BaseException as error:  # noqa: BLE001 - reported below
            failures.append(error)

    threads = [threading.Thread(target=record, args=(name,)) for name in tokenizers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures
    stats = _stats(db, dataset_id)
    assert stats is not None and stats["rows"] == 3
    assert sorted(stats["token_lengths"]) == tokenizers


def test_a_deleted_dataset_is_named(db: Database):
    with pytest.raises(dataset_rows.DatasetGone, match="ds_missing"):
        dataset_rows.record_token_lengths(db, "ds_missing", "gemma-3-270m", {})
