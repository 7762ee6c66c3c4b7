"""Every accepted row shape (TRL's standard and conversational, explicit and implicit prompt; OpenAI's preference
fine-tuning rows), the sources (JSONL, Parquet, Hugging Face ``save_to_disk`` folders) and the statistics."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ctpd_core.data import (
    DatasetError,
    PreferencePair,
    load_pairs,
    pairs_fingerprint,
    parse_pairs,
    parse_row,
    plain_prompt,
    validate_file,
)

FORMATS = Path(__file__).resolve().parents[2] / "examples" / "data" / "formats"
SYSTEM = ("system", "You are a concise, friendly assistant.")
# The three conversations every conversational example file holds, each in its own shape.
CONVERSATIONS = [
    PreferencePair("What is the capital of France?", "Paris.", "Lyon, I think.",
                   (("user", "What is the capital of France?"),)),
    PreferencePair(plain_prompt([SYSTEM, ("user", "Give me a word that rhymes with cat.")]), "Hat.", "Dog.",
                   (SYSTEM, ("user", "Give me a word that rhymes with cat."))),
    PreferencePair(
        plain_prompt([SYSTEM, ("user", "I have 3 apples."), ("assistant", "Nice, three apples."),
                      ("user", "I eat one. How many are left?")]),
        "Two apples are left.", "Four.",
        (SYSTEM, ("user", "I have 3 apples."), ("assistant", "Nice, three apples."),
         ("user", "I eat one. How many are left?")),
    ),
]


def _jsonl(rows) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (FORMATS / name).read_text(encoding="utf-8").splitlines()]


def _error(row) -> str:
    with pytest.raises(DatasetError) as caught:
        parse_pairs(_jsonl([row]), ".jsonl")
    (error,) = caught.value.errors
    return error.message


# ------------------------------------------------------------------------------------------ shapes


def test_the_standard_example_files():
    assert load_pairs(FORMATS / "standard_explicit.jsonl")[0] == PreferencePair("The capital of France is", " Paris.",
                                                                                 " Lyon.")
    implicit = load_pairs(FORMATS / "standard_implicit.jsonl")
    assert implicit[0] == PreferencePair("The capital of France is", " Paris.", " Lyon.")
    assert validate_file(FORMATS / "standard_implicit.jsonl").stats["shapes"] == {"standard_implicit": 3}


@pytest.mark.parametrize("name,shape", [
    ("conversational_explicit.jsonl", "conversational_explicit"),
    ("conversational_implicit.jsonl", "conversational_implicit"),  # ultrafeedback_binarized's shape
    ("openai_preference.jsonl", "openai_preference"),
])
def test_every_conversational_shape_reads_as_the_same_conversations(name, shape):
    """System turns and multi-turn prompts kept as messages; the three shapes of one conversation are one pair."""
    validated = validate_file(FORMATS / name)
    assert validated.pairs == CONVERSATIONS
    assert validated.stats["shapes"] == {shape: 3}
    assert validated.stats["system_turn_rows"] == 2 and validated.stats["multi_turn_rows"] == 1


def test_the_plain_rendering_of_a_conversation():
    assert plain_prompt([("user", "Hi?")]) == "Hi?"  # one user turn: its text, as before conversations had messages
    assert plain_prompt([SYSTEM, ("user", "Hi?")]) == (
        "System: You are a concise, friendly assistant.\n\nUser: Hi?\n\nAssistant: "
    )


def test_implicit_conversations_split_at_their_shared_prefix_of_messages():
    user, first, second = ({"role": "user", "content": "Q"}, {"role": "assistant", "content": "A1"},
                           {"role": "assistant", "content": "A2"})
    pair = parse_row({"chosen": [user, first], "rejected": [user, second]})
    assert pair == PreferencePair("Q", "A1", "A2", (("user", "Q"),))
    # Only the final reply may differ: a conversation that differs earlier is not one prompt with two answers.
    other_user = {"role": "user", "content": "Q2"}
    message = _error({"chosen": [user, first, other_user, first], "rejected": [user, second, other_user, second]})
    assert "after the 1 message(s) chosen and rejected share, chosen has 3 more" in message
    assert "share no leading messages" in _error({"chosen": [user, first], "rejected": [other_user, second]})


@pytest.mark.parametrize("row,expected", [
    ({"prompt": [{"role": "user", "content": "a"}, {"role": "system", "content": "s"}], "chosen": "x",
      "rejected": "y"}, "message 2 is a system turn: a system message may only come first"),
    ({"prompt": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "chosen": "x",
      "rejected": "y"}, "message 2 is a user turn: expected a assistant turn"),
    ({"prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "chosen": "x",
      "rejected": "y"}, "must end with a user turn"),
    ({"prompt": [{"role": "system", "content": "s"}], "chosen": "x", "rejected": "y"}, "only a system message"),
    ({"prompt": [{"role": "tool", "content": "a"}], "chosen": "x", "rejected": "y"}, "role 'tool'; use system"),
    ({"prompt": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]}], "chosen": "x",
      "rejected": "y"}, "has image_url parts; only text is supported"),
    ({"prompt": [{"role": "user", "content": "a"}], "chosen": [{"role": "assistant", "content": None,
      "tool_calls": [{"id": "1"}]}], "rejected": "y"}, "chosen is a tool call"),
    ({"prompt": [{"role": "user", "content": "a"}], "chosen": [{"role": "assistant", "content": "x"}] * 2,
      "rejected": "y"}, "chosen must hold exactly one assistant message, not 2"),
    ({"prompt": [{"role": "user", "content": "a"}], "chosen": "x", "rejected": {"role": "user", "content": "y"}},
     "rejected is a user message; the response must be the assistant's"),
    ({"prompt": [{"role": "user", "content": "a"}], "chosen": [{"role": "user", "content": "a"},
      {"role": "assistant", "content": "x"}], "rejected": [{"role": "user", "content": "a"},
      {"role": "assistant", "content": "y"}]}, "give either the prompt and one assistant reply each"),
    ({"input": {"messages": [{"role": "user", "content": "a"}]}, "preferred_output": [
        {"role": "assistant", "content": "x"}]}, "missing field(s) non_preferred_output"),
    ({"input": [{"role": "user", "content": "a"}], "preferred_output": "x", "non_preferred_output": "y"},
     "input must be an object with a messages list"),
    ({"input": {"messages": [{"role": "user", "content": "a"}]}, "preferred_output": [
        {"role": "assistant", "content": " "}], "non_preferred_output": "y"}, "chosen is empty"),
])
def test_a_bad_conversational_row_says_what_and_how_to_fix_it(row, expected):
    assert expected in _error(row)


# ------------------------------------------------------------------------------------------ fingerprints


def test_the_fingerprint_sees_the_messages():
    """The prepare stage's cache key: a changed turn or role must change it, even where the plain text does not."""
    standard = PreferencePair("Hi?", "a", "b")
    conversational = PreferencePair("Hi?", "a", "b", (("user", "Hi?"),))
    with_system = PreferencePair("Hi?", "a", "b", (("system", "s"), ("user", "Hi?")))
    fingerprints = {pairs_fingerprint([pair]) for pair in (standard, conversational, with_system)}
    assert len(fingerprints) == 3
    assert pairs_fingerprint([conversational]) == pairs_fingerprint([PreferencePair("Hi?", "a", "b", (("user", "Hi?"),))])


# ------------------------------------------------------------------------------------------ sources


def test_parquet_holds_conversational_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "pairs.parquet"
    pq.write_table(pa.Table.from_pylist(_rows("conversational_explicit.jsonl")), path)
    assert load_pairs(path) == CONVERSATIONS


def test_a_saved_dataset_folder(tmp_path):
    from datasets import Dataset

    folder = tmp_path / "saved"
    rows = _rows("openai_preference.jsonl")
    # Arrow needs one type per column: the example's text-parts content becomes a string here.
    rows[2]["input"]["messages"][-1]["content"] = "I eat one. How many are left?"
    Dataset.from_list(rows).save_to_disk(str(folder))
    assert load_pairs(folder) == CONVERSATIONS
    with pytest.raises(DatasetError, match="holds one Dataset .no splits.*leave dataset.split out"):
        load_pairs(folder, split="train")


def test_a_saved_dataset_dict_needs_its_split_named(tmp_path):
    from datasets import Dataset, DatasetDict

    folder = tmp_path / "saved"
    DatasetDict({
        "train": Dataset.from_list(_rows("conversational_implicit.jsonl")),
        "test": Dataset.from_list(_rows("standard_explicit.jsonl")),
    }).save_to_disk(str(folder))
    assert load_pairs(folder, split="train") == CONVERSATIONS
    assert load_pairs(folder, split="test")[0].prompt == "The capital of France is"
    with pytest.raises(DatasetError, match="splits train, test; choose one with dataset.split"):
        load_pairs(folder)
    with pytest.raises(DatasetError, match="no split 'validation' .dataset.split.; its splits are train, test"):
        load_pairs(folder, split="validation")
    one = tmp_path / "one"
    DatasetDict({"train": Dataset.from_list(_rows("standard_explicit.jsonl"))}).save_to_disk(str(one))
    assert len(load_pairs(one)) == 3  # the only split needs no name


def test_a_saved_folder_with_a_bad_row_names_it(tmp_path):
    from datasets import Dataset

    rows = _rows("standard_explicit.jsonl")
    rows[1] = {**rows[1], "chosen": ""}
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(DatasetError, match="row 2: chosen is empty"):
        load_pairs(tmp_path / "saved")


def test_a_plain_folder_and_a_split_on_a_file_are_refused(tmp_path):
    with pytest.raises(DatasetError, match="not one written by save_to_disk"):
        load_pairs(tmp_path)
    with pytest.raises(DatasetError, match="applies to a Hugging Face datasets folder"):
        load_pairs(FORMATS / "standard_explicit.jsonl", split="train")


def test_reading_a_saved_folder_imports_no_torch(tmp_path):
    """ctpd_core.data is the torch-free API's validator: datasets must not pull torch in while it reads."""
    from datasets import Dataset

    Dataset.from_list(_rows("conversational_explicit.jsonl")).save_to_disk(str(tmp_path / "saved"))
    script = (
        "import sys\n"
        "from ctpd_core.data import load_pairs\n"
        f"assert len(load_pairs({str(tmp_path / 'saved')!r})) == 3\n"
        "print(sorted(name for name in ('torch', 'transformers', 'numpy') if name in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).resolve().parents[2])
    # datasets itself needs numpy (pyarrow's arrays); what matters is that no torch and no transformers arrive.
    assert "torch" not in result.stdout and "transformers" not in result.stdout


# ------------------------------------------------------------------------------------------ statistics


def test_statistics_count_duplicates_identical_pairs_and_lengths():
    rows = [
        {"prompt": "ab", "chosen": "x", "rejected": "yy"},
        {"prompt": "ab", "chosen": "x", "rejected": "yy"},  # a duplicate row (and prompt)
        {"prompt": "ab", "chosen": "zzz", "rejected": "zzz"},  # the prompt again; identical responses
        {"prompt": [{"role": "user", "content": "ab"}], "chosen": "x", "rejected": "yy"},  # a conversation: its own
        {"chosen": "The cat sat.", "rejected": "The cat ran."},  # implicit: prompt "The cat", " sat." / " ran."
    ]
    stats = parse_stats(rows)
    assert stats["rows"] == 5
    assert stats["shapes"] == {"standard_explicit": 3, "standard_implicit": 1, "conversational_explicit": 1}
    assert (stats["duplicate_rows"], stats["duplicate_prompts"], stats["identical_pairs"]) == (1, 2, 1)
    assert (stats["system_turn_rows"], stats["multi_turn_rows"]) == (0, 0)
    # prompt lengths 2, 2, 2, 2, 7; chosen 1, 1, 3, 1, 5; rejected 2, 2, 3, 2, 5 (nearest-rank percentiles)
    assert stats["length_chars"]["prompt"] == {"min": 2, "mean": 3.0, "p50": 2, "p90": 7, "p99": 7, "max": 7}
    assert stats["length_chars"]["chosen"] == {"min": 1, "mean": 2.2, "p50": 1, "p90": 5, "p99": 5, "max": 5}
    assert stats["length_chars"]["rejected"]["mean"] == 2.8


def test_length_percentiles_are_nearest_rank():
    """p90 of ten lengths 1..10 is the 9th (ceil(0.9 * 10)); a float rank (9.000000000000002) would give the 10th."""
    rows = [{"prompt": "p" * length, "chosen": "a", "rejected": "b"} for length in range(10, 0, -1)]
    prompt = parse_stats(rows)["length_chars"]["prompt"]
    assert (prompt["min"], prompt["p50"], prompt["p90"], prompt["p99"], prompt["max"]) == (1, 5, 9, 10, 10)
    assert prompt["mean"] == 5.5


def parse_stats(rows) -> dict:
    validator_result = validate_bytes(_jsonl(rows))
    assert validator_result.stats is not None
    return validator_result.stats


def validate_bytes(data: bytes):
    from ctpd_core.data import streaming_validator

    validator = streaming_validator(".jsonl", keep_pairs=False)
    validator.feed(data)
    return validator.finish()
