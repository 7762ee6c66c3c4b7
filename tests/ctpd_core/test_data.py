"""Dataset parsing: the standard preference formats, row-level errors with line numbers, all-or-nothing.
(The conversational and OpenAI shapes, the datasets folders and the statistics: test_data_formats.py.)"""

from __future__ import annotations

import io
import json

import pytest

from ctpd_core.data import DatasetError, PreferencePair, load_pairs, pairs_fingerprint, parse_pairs


def _jsonl(rows) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def test_explicit_prompt_format():
    pairs = parse_pairs(_jsonl([{"prompt": "Q:", "chosen": " yes", "rejected": " no", "extra": 1}]), ".jsonl")
    assert pairs == [PreferencePair("Q:", " yes", " no")]


def test_implicit_prompt_splits_on_a_word_boundary():
    (pair,) = parse_pairs(_jsonl([{"chosen": "The cat sat down.", "rejected": "The cat ran off."}]), ".jsonl")
    assert pair.prompt == "The cat" and pair.chosen == " sat down." and pair.rejected == " ran off."
    assert pair.prompt + pair.chosen == "The cat sat down."


def test_conversational_format():
    row = {
        "prompt": [{"role": "user", "content": "Hi?"}],
        "chosen": [{"role": "assistant", "content": "Hello!"}],
        "rejected": {"role": "assistant", "content": "Go away."},
    }
    assert parse_pairs(json.dumps([row]).encode(), ".json") == [
        PreferencePair("Hi?", "Hello!", "Go away.", messages=(("user", "Hi?"),))
    ]


def test_json_with_data_key_and_parquet(tmp_path):
    rows = [{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "d", "chosen": "e", "rejected": "f"}]
    assert len(parse_pairs(json.dumps({"data": rows}).encode(), ".json")) == 2
    import pyarrow as pa
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buffer)
    path = tmp_path / "pairs.parquet"
    path.write_bytes(buffer.getvalue())
    assert load_pairs(path) == [PreferencePair("a", "b", "c"), PreferencePair("d", "e", "f")]


def test_row_errors_name_the_line_and_nothing_is_returned():
    data = (
        _jsonl([{"prompt": "ok", "chosen": "a", "rejected": "b"}])
        + b"{not json}\n"
        + _jsonl([{"prompt": "x", "chosen": "a"}, {"prompt": "x", "chosen": "a", "rejected": " "}])
        + b"\n"
        + _jsonl([{"prompt": "x", "chosen": "", "rejected": "b"}, {"prompt": 3, "chosen": "a", "rejected": "b"}])
    )
    with pytest.raises(DatasetError) as caught:
        parse_pairs(data, ".jsonl")
    error = caught.value
    assert [e.row for e in error.errors] == [2, 3, 4, 6, 7]
    messages = {e.row: e.message for e in error.errors}
    assert "invalid JSON" in messages[2]
    assert "missing field(s) rejected" in messages[3]
    assert "rejected is empty" in messages[4]
    assert "chosen is empty" in messages[6]
    assert "prompt must be a string or a non-empty list of messages" in messages[7]
    assert "5 invalid row(s); nothing was loaded" in str(error)


def test_file_level_errors():
    with pytest.raises(DatasetError, match="unsupported dataset format"):
        parse_pairs(b"", ".csv")
    with pytest.raises(DatasetError, match="no rows"):
        parse_pairs(b"\n\n", ".jsonl")
    with pytest.raises(DatasetError, match="not UTF-8"):
        parse_pairs(b"\xff\xfe{}", ".jsonl")
    with pytest.raises(DatasetError, match="list of rows"):
        parse_pairs(b'{"rows": []}', ".json")
    with pytest.raises(DatasetError, match="does not exist"):
        load_pairs("/nonexistent/pairs.jsonl")


def test_identical_responses_are_counted_and_left_out_of_training(tmp_path):
    """Valid rows (a tie in a ranked dataset), but no preference to learn: load_pairs drops them."""
    rows = [{"prompt": "x", "chosen": "same", "rejected": "same"}, {"prompt": "y", "chosen": "a", "rejected": "b"}]
    assert len(parse_pairs(_jsonl(rows), ".jsonl")) == 2
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(_jsonl(rows))
    assert load_pairs(path) == [PreferencePair("y", "a", "b")]
    path.write_bytes(_jsonl(rows[:1]))
    with pytest.raises(DatasetError, match="none carries a preference"):
        load_pairs(path)


def test_fingerprint_is_content_not_format():
    rows = [{"prompt": "a", "chosen": "b", "rejected": "c"}]
    assert pairs_fingerprint(parse_pairs(_jsonl(rows), ".jsonl")) == pairs_fingerprint(
        parse_pairs(json.dumps(rows).encode(), ".json")
    )
    assert pairs_fingerprint([PreferencePair("ab", "c", "d")]) != pairs_fingerprint([PreferencePair("a", "bc", "d")])
