"""The streaming dataset readers: any chunking gives what the whole file gives; lone surrogates are row errors."""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ctpd_core.data import (
    PARQUET_BATCH_ROWS,
    DatasetError,
    PreferencePair,
    load_pairs,
    parse_pairs,
    streaming_validator,
    validate_file,
)

ROWS = [
    {"prompt": "Q: é?", "chosen": " yes 😀", "rejected": " no"},
    {"chosen": "Paris is in France.", "rejected": "Paris is in Spain."},
    {"prompt": [{"role": "user", "content": "Hi?"}], "chosen": [{"role": "assistant", "content": "Hello!"}],
     "rejected": {"role": "assistant", "content": "Go away."}},
    {"prompt": "x", "chosen": "same", "rejected": ""},  # a bad row: an empty response
    {"prompt": "line\u2028separator", "chosen": " a\u0085b", "rejected": " c"},  # not line breaks in JSONL
]


def _outcome(feed_pieces, file_format: str):
    validator = streaming_validator(file_format)
    try:
        for piece in feed_pieces:
            validator.feed(piece)
        dataset = validator.finish()
    except DatasetError as error:
        return "error", str(error), [(e.row, e.message) for e in error.errors]
    return "ok", dataset.num_rows, dataset.pairs


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(cut, len(data)) for cut in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


def _documents(rows: list[dict]) -> dict[str, bytes]:
    return {
        "jsonl": "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode(),
        "json list": json.dumps(rows, indent=1, ensure_ascii=False).encode(),
        "json object": json.dumps({"meta": {"x": [1, "]", {"data": 2}]}, "data": rows, "n": 12.5e3},
                                  ensure_ascii=False).encode(),
        "json with a BOM": b"\xef\xbb\xbf" + json.dumps(rows).encode(),
    }


@settings(max_examples=60, deadline=None)
@given(rows=st.lists(st.sampled_from(ROWS), min_size=0, max_size=12),
       cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=40))
def test_any_chunking_gives_what_the_whole_file_gives(rows, cuts):
    for name, data in _documents(rows).items():
        file_format = ".jsonl" if name == "jsonl" else ".json"
        whole = _outcome([data], file_format)
        assert _outcome(_split(data, cuts), file_format) == whole, name
        assert _outcome([data[i:i + 1] for i in range(len(data))], file_format) == whole, name


def test_the_streamed_json_reader_agrees_with_json_loads():
    rows = [ROWS[0], ROWS[1], ROWS[2]]
    for name, data in _documents(rows).items():
        if name != "jsonl":
            expected = json.loads(data.decode("utf-8-sig"))
            expected = expected["data"] if isinstance(expected, dict) else expected
            assert len(parse_pairs(data, ".json")) == len(expected) == 3
    for broken in ('[{"prompt": "a", "chosen": "b", "rejected": "c"},\n {"prompt": "a" "chosen": 1}]',
                   '[{"prompt": "a", "chosen": "b", "rejected": "c"}] x', '{"data": [{"a": 1}], "b": [1,}',
                   '[{"prompt": "a\nb", "chosen": "b", "rejected": "c"}]'):
        with pytest.raises(json.JSONDecodeError) as reference:
            json.loads(broken)
        for pieces in ([broken.encode()], _split(broken.encode(), [3, 17, 30, 51])):
            with pytest.raises(DatasetError, match=f"invalid JSON at line {reference.value.lineno} column "
                                                   f"{reference.value.colno}: "):
                _outcome_or_raise(pieces)


def _outcome_or_raise(pieces: list[bytes]) -> None:
    validator = streaming_validator(".json")
    for piece in pieces:
        validator.feed(piece)
    validator.finish()


def test_document_shapes_that_are_not_a_row_list():
    for document in (b'{"rows": []}', b"5", b'{"data": 5}', b"{}", b'"text"'):
        with pytest.raises(DatasetError, match="must be a list of rows"):
            parse_pairs(document, ".json")
    with pytest.raises(DatasetError, match="more than one 'data' key"):
        parse_pairs(b'{"data": [], "data": []}', ".json")
    with pytest.raises(DatasetError, match="no rows"):
        parse_pairs(b'{"data": []}', ".json")
    with pytest.raises(DatasetError, match="ends before"):
        parse_pairs(b'[{"prompt": "a", "chosen": "b", "rejected": "c"}, ', ".json")
    with pytest.raises(DatasetError, match=r"not UTF-8 text \(byte 13\)"):
        parse_pairs(b'[{"prompt": "\xff"}]', ".json")
    with pytest.raises(DatasetError, match=r"not UTF-8 text \(byte 26\)"):  # the file's offset, not the line's
        parse_pairs(b'{"prompt": 1}\n{"prompt": "\xff"}\n', ".jsonl")


def test_a_lone_surrogate_is_a_row_error_in_every_field_and_format(tmp_path):
    good = {"prompt": "p", "chosen": " a", "rejected": " b"}
    bad_rows = [
        {"prompt": "p\ud800", "chosen": " a", "rejected": " b"},
        {"prompt": "p", "chosen": " a\udfff", "rejected": " b"},
        {"chosen": "same start \ud83d", "rejected": "same start x"},  # implicit prompt: half an emoji
        {"prompt": [{"role": "user", "content": "\udc00"}], "chosen": " a", "rejected": " b"},
    ]
    jsonl = "".join(json.dumps(row) + "\n" for row in [good, *bad_rows, good]).encode()  # json.dumps escapes them
    assert b"\\ud800" in jsonl
    with pytest.raises(DatasetError) as caught:
        parse_pairs(jsonl, ".jsonl")
    assert [error.row for error in caught.value.errors] == [2, 3, 4, 5]
    messages = [error.message for error in caught.value.errors]
    assert messages[0].startswith("prompt contains a lone UTF-16 surrogate (\\ud800 at character 1)")
    assert messages[1].startswith("chosen contains") and messages[2].startswith("chosen contains")
    assert messages[3].startswith("prompt's message 1's content contains")
    assert all("fix the \\u escape" in message for message in messages)

    # the worker's loader gives the same error, before anything is tokenized
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps([good, bad_rows[0]]))
    with pytest.raises(DatasetError, match=r"row 2: prompt contains a lone UTF-16 surrogate"):
        load_pairs(path)

    # a surrogate *pair* is one character above U+FFFF, and fine
    (pair,) = parse_pairs(b'{"prompt": "p", "chosen": " \\ud83d\\ude00", "rejected": " b"}', ".jsonl")
    assert pair.chosen == " \U0001f600"


def test_jsonl_lines_end_only_at_newlines(tmp_path):
    """U+2028, U+0085 and friends are characters inside a JSON string, not line ends (str.splitlines thinks so)."""
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(json.dumps(ROWS[4], ensure_ascii=False).encode() + b"\r\n\n" + json.dumps(ROWS[0]).encode())
    assert load_pairs(path) == [PreferencePair("line\u2028separator", " a\u0085b", " c"),
                                PreferencePair("Q: é?", " yes 😀", " no")]


def test_parquet_is_read_in_batches_with_row_numbers_across_them(tmp_path):
    count = 3 * PARQUET_BATCH_ROWS + 5
    rows = [{"prompt": f"p{i}", "chosen": f" a{i}", "rejected": f" b{i}"} for i in range(count)]
    rows[PARQUET_BATCH_ROWS + 1]["chosen"] = " "  # row PARQUET_BATCH_ROWS + 2 (1-based), in the second batch
    path = tmp_path / "pairs.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=1000)
    with pytest.raises(DatasetError) as caught:
        validate_file(path, keep_pairs=False)
    assert [error.row for error in caught.value.errors] == [PARQUET_BATCH_ROWS + 2]
    rows[PARQUET_BATCH_ROWS + 1]["chosen"] = " fixed"
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buffer)
    path.write_bytes(buffer.getvalue())
    dataset = validate_file(path, keep_pairs=False)
    assert (dataset.num_rows, dataset.pairs) == (count, None)
    assert len(load_pairs(path)) == count
