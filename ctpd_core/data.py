"""Preference datasets: reading and validating (prompt, chosen, rejected) rows, and their statistics. Torch-free.

Sources: a JSONL file (one object per line), a JSON file (a list of objects, or ``{"data": [...]}``), a Parquet
file, or a Hugging Face ``datasets`` folder written by ``save_to_disk`` (a ``Dataset``, or a ``DatasetDict`` and
the split to read). Row shapes (docs/datasets.md has an example of each; :data:`SHAPES` names them):

* ``standard_explicit``: ``{"prompt": str, "chosen": str, "rejected": str}`` (``prompt + chosen`` is the full
  text);
* ``standard_implicit``: ``{"chosen": str, "rejected": str}``, full texts sharing a prefix; the prompt is the
  longest common prefix, cut back to the last whitespace so no word is split;
* ``conversational_explicit`` (TRL): ``prompt`` a list of ``{"role", "content"}`` messages (an optional first
  system turn, then user and assistant turns alternating, ending with a user turn), and ``chosen`` /
  ``rejected`` one assistant message each (or a list holding one);
* ``conversational_implicit`` (TRL; the ``ultrafeedback_binarized`` shape): ``chosen`` and ``rejected`` are
  whole conversations and the prompt is their shared prefix of messages; after it, each must hold exactly one
  assistant message. A string ``prompt`` beside them (ultrafeedback has one) is redundant and ignored;
* ``openai_preference`` (OpenAI's preference fine-tuning): ``{"input": {"messages": [...]}, "preferred_output":
  [assistant message], "non_preferred_output": [assistant message]}`` (other keys of ``input``, such as
  ``tools``, are ignored).

A conversational row keeps its prompt as messages (:attr:`PreferencePair.messages`), so the prepare stage renders
it with each model's own chat template (``ctpd_core.encoding``); :attr:`PreferencePair.prompt` holds the plain
rendering (:func:`plain_prompt`), used where a tokenizer has no template. Responses are text, the same string for
both models. A message's content is a string, or a list of text parts (``{"type": "text", "text": ...}``).

Validation is all-or-nothing and row-level: every bad row is reported with its line (JSONL) or row number,
and nothing is returned if any row is bad, so a caller never stores half a dataset. A row whose chosen and
rejected are identical is valid but carries no preference: the statistics count it (``identical_pairs``) and
:func:`load_pairs` leaves it out of training.

One row validator (:func:`parse_row`) serves every caller. The files are read as streams, so memory is one
chunk plus the longest row, not the file (and, for the statistics, a few bytes per row): the worker's loader
(:func:`load_pairs`) reads its file in chunks and keeps only the pairs, and the API's upload feeds a
:func:`streaming_validator` the request body as it arrives and keeps nothing (``keep_pairs=False``). JSONL is
split on ``\\n``; JSON is decoded one element of its row list at a time (:class:`_JsonRows`); Parquet, which
needs random access, is read from its file in record batches (:func:`validate_file`); a ``datasets`` folder is
memory-mapped Arrow, read row by row.
"""

from __future__ import annotations

import codecs
import hashlib
import io
import json
import logging
import re
from array import array
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

logger = logging.getLogger(__name__)

MAX_REPORTED_ERRORS = 20
READ_CHUNK = 1 << 20
PARQUET_BATCH_ROWS = 1024
MIN_RETRY_GROWTH = 64  # characters
FORMATS = (".jsonl", ".json", ".parquet")
SHAPES = ("standard_explicit", "standard_implicit", "conversational_explicit", "conversational_implicit",
          "openai_preference")
ROLES = ("system", "user", "assistant")
_BOM = b"\xef\xbb\xbf"
# json.loads joins an escaped surrogate pair ("\ud83d\ude00") into one character, so any surrogate left in
# a decoded string is a lone one: not Unicode text, and it cannot be encoded as UTF-8 (the tokenizers do).
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")

Message = tuple[str, str]  # (role, content)


@dataclass(frozen=True)
class PreferencePair:
    prompt: str  # the prompt text; for a conversational row, the plain rendering of ``messages``
    chosen: str
    rejected: str
    # A conversational row's prompt as (role, content) messages, rendered with each model's chat template;
    # None for a standard (text) row.
    messages: tuple[Message, ...] | None = None

    @property
    def carries_preference(self) -> bool:
        return self.chosen != self.rejected


@dataclass(frozen=True)
class RowError:
    row: int  # 1-based line (JSONL) or row number (JSON, Parquet, a datasets folder)
    message: str

    def __str__(self) -> str:
        return f"row {self.row}: {self.message}"


class DatasetError(ValueError):
    """The dataset cannot be used; ``errors`` lists the offending rows (at most MAX_REPORTED_ERRORS)."""

    def __init__(self, message: str, errors: list[RowError] | None = None, total_errors: int | None = None) -> None:
        self.errors = errors or []
        self.total_errors = total_errors if total_errors is not None else len(self.errors)
        detail = "; ".join(str(error) for error in self.errors[:5])
        more = f" (and {self.total_errors - 5} more)" if self.total_errors > 5 else ""
        super().__init__(f"{message}: {detail}{more}" if detail else message)


@dataclass(frozen=True)
class ValidatedDataset:
    num_rows: int
    pairs: list[PreferencePair] | None  # None when validated with keep_pairs=False
    stats: dict[str, Any] | None = None  # DatasetStats.result(): what the rows hold


# ------------------------------------------------------------------------------------------ one row


def _text(value: str, field: str) -> str:
    found = _LONE_SURROGATE.search(value)
    if found:
        raise ValueError(
            f"{field} contains a lone UTF-16 surrogate (\\u{ord(found.group()):04x} at character {found.start()}), "
            "which is not valid Unicode text; fix the \\u escape (a character above U+FFFF is written as a pair, "
            "e.g. \\ud83d\\ude00) or remove it"
        )
    return value


def _content(value: Any, field: str) -> str:
    """A message's content: a string, or a list of text parts (OpenAI's and multimodal datasets' shape)."""
    if isinstance(value, str):
        return _text(value, field)
    if isinstance(value, list) and value and all(isinstance(part, dict) for part in value):
        kinds = {part.get("type") for part in value}
        if kinds == {"text"} and all(isinstance(part.get("text"), str) for part in value):
            return _text("".join(part["text"] for part in value), field)
        other = sorted(str(kind) for kind in kinds - {"text"})
        if other:
            raise ValueError(f"{field} has {', '.join(other)} parts; only text is supported: keep the text parts "
                             "(or give the content as a string)")
    raise ValueError(f"{field} must be a string (or a list of {{'type': 'text', 'text': str}} parts)")


def _message(value: Any, field: str) -> Message:
    if not isinstance(value, dict):
        raise ValueError(f"{field} must be a message {{'role': ..., 'content': str}}, not {type(value).__name__}")
    role = value.get("role")
    if role not in ROLES:
        raise ValueError(f"{field} has role {role!r}; use system, user or assistant")
    if value.get("content") is None and value.get("tool_calls"):
        raise ValueError(f"{field} is a tool call; only text messages are supported: remove the row")
    return role, _content(value.get("content"), f"{field}'s content")


def _messages(value: Any, field: str) -> list[Message]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"{field} must be a non-empty list of messages {{'role': ..., 'content': str}}")
    return [_message(item, f"{field}'s message {number}") for number, item in enumerate(value, 1)]


def _checked_prompt(messages: list[Message], field: str) -> tuple[Message, ...]:
    """A conversation every chat template renders: an optional first system turn, then user and assistant turns
    alternating, ending with the user turn the response answers (Gemma's template, for one, refuses anything
    else)."""
    first_turn = 1 if messages and messages[0][0] == "system" else 0
    if first_turn == len(messages):
        raise ValueError(f"{field} holds only a system message; add the user turn the response answers")
    for index in range(first_turn, len(messages)):
        role, expected = messages[index][0], ("user", "assistant")[(index - first_turn) % 2]
        if role == expected:
            continue
        if role == "system":
            why = "a system message may only come first"
        else:
            why = f"expected a {expected} turn (user and assistant turns alternate; merge consecutive turns)"
        raise ValueError(f"{field}'s message {index + 1} is a {role} turn: {why}")
    if messages[-1][0] != "user":
        raise ValueError(f"{field} must end with a user turn (the response answers it), not an assistant turn; "
                         "move that last assistant message into chosen/rejected or drop it")
    return tuple(messages)


def _reply(value: Any, field: str) -> str:
    """One assistant message (or a list holding one, or its text): the response text."""
    if isinstance(value, str):
        return _text(value, field)
    if isinstance(value, list):
        if len(value) != 1:
            raise ValueError(f"{field} must hold exactly one assistant message, not {len(value)}")
        value = value[0]
    if not isinstance(value, dict) or "content" not in value:
        raise ValueError(f"{field} must be a string or an assistant message {{'role': 'assistant', 'content': str}}")
    role, content = _message(value, field)
    if role != "assistant":
        raise ValueError(f"{field} is a {role} message; the response must be the assistant's")
    return content


def plain_prompt(messages: Iterable[Message]) -> str:
    """The prompt text of a conversation, for a tokenizer without a chat template: one user turn is its content;
    anything longer is each turn labelled (``User: ...``), blank-line separated, ending with ``Assistant: ``."""
    messages = list(messages)
    if len(messages) == 1 and messages[0][0] == "user":
        return messages[0][1]
    turns = [f"{role.capitalize()}: {content}" for role, content in messages]
    return "\n\n".join([*turns, "Assistant: "])


def _conversational(messages: tuple[Message, ...], chosen: str, rejected: str) -> PreferencePair:
    return PreferencePair(plain_prompt(messages), chosen, rejected, messages)


def _shared_prefix(chosen: list[Message], rejected: list[Message]) -> int:
    """How many leading messages the two conversations share, leaving each at least its last one."""
    shared = 0
    for a, b in zip(chosen[:-1], rejected[:-1], strict=False):
        if a != b:
            break
        shared += 1
    return shared


def _implicit_conversation(chosen_value: Any, rejected_value: Any) -> PreferencePair:
    chosen, rejected = _messages(chosen_value, "chosen"), _messages(rejected_value, "rejected")
    shared = _shared_prefix(chosen, rejected)
    if not shared:
        raise ValueError("chosen and rejected are whole conversations that share no leading messages, so there is "
                         "no prompt; start both with the same user turn, or give the prompt as its own field")
    for field, conversation in (("chosen", chosen), ("rejected", rejected)):
        rest = conversation[shared:]
        if len(rest) != 1 or rest[0][0] != "assistant":
            raise ValueError(
                f"after the {shared} message(s) chosen and rejected share, {field} has {len(rest)} more "
                f"({', '.join(role for role, _ in rest)}); a pair compares one final assistant reply to the same "
                "conversation: make the conversations differ only in their last assistant message"
            )
    messages = _checked_prompt(chosen[:shared], "the shared prompt")
    return _conversational(messages, chosen[shared][1], rejected[shared][1])


def _openai_row(row: dict[str, Any]) -> PreferencePair:
    missing = [key for key in ("input", "preferred_output", "non_preferred_output") if key not in row]
    if missing:
        raise ValueError(f"missing field(s) {', '.join(missing)}; an OpenAI preference row needs input "
                         "({'messages': [...]}), preferred_output and non_preferred_output")
    source = row["input"]
    if not isinstance(source, dict) or "messages" not in source:
        raise ValueError("input must be an object with a messages list: {'input': {'messages': [...]}}")
    messages = _checked_prompt(_messages(source["messages"], "input.messages"), "input.messages")
    return _conversational(messages, _reply(row["preferred_output"], "preferred_output"),
                           _reply(row["non_preferred_output"], "non_preferred_output"))


def _is_conversation(value: Any) -> bool:
    """A list of messages that is more than one reply: it holds a non-assistant turn."""
    return isinstance(value, list) and any(isinstance(item, dict) and item.get("role") != "assistant"
                                           for item in value)


def _split_implicit_prompt(chosen: str, rejected: str) -> tuple[str, str, str]:
    common = 0
    for a, b in zip(chosen, rejected, strict=False):
        if a != b:
            break
        common += 1
    cut = max(chosen.rfind(" ", 0, common), chosen.rfind("\n", 0, common))
    cut = cut if cut > 0 else 0
    return chosen[:cut], chosen[cut:], rejected[cut:]


def _parse_row(row: Any) -> tuple[PreferencePair, str]:
    """One row in any supported shape, and the shape's name (one of SHAPES)."""
    if not isinstance(row, dict):
        raise ValueError(f"expected an object with prompt/chosen/rejected, got {type(row).__name__}")
    if "chosen" not in row and any(key in row for key in ("input", "preferred_output", "non_preferred_output")):
        pair, shape = _openai_row(row), "openai_preference"
    else:
        missing = [key for key in ("chosen", "rejected") if key not in row]
        if missing:
            raise ValueError(f"missing field(s) {', '.join(missing)}; each row needs chosen and rejected (and usually "
                             "prompt), or OpenAI's input / preferred_output / non_preferred_output")
        pair, shape = _trl_row(row)
    if not pair.chosen.strip():
        raise ValueError("chosen is empty; remove the row or give the preferred response")
    if not pair.rejected.strip():
        raise ValueError("rejected is empty; remove the row or give the dispreferred response")
    return pair, shape


def _trl_row(row: dict[str, Any]) -> tuple[PreferencePair, str]:
    chosen, rejected, prompt = row["chosen"], row["rejected"], row.get("prompt")
    if _is_conversation(chosen) or _is_conversation(rejected):
        if isinstance(prompt, list):
            raise ValueError("prompt is a list of messages and chosen/rejected are whole conversations; give either "
                             "the prompt and one assistant reply each, or the whole conversations without a prompt")
        return _implicit_conversation(chosen, rejected), "conversational_implicit"  # a string prompt is redundant
    if prompt is not None and not isinstance(prompt, str):
        if not isinstance(prompt, list) or not prompt:
            raise ValueError("prompt must be a string or a non-empty list of messages")
        messages = _checked_prompt(_messages(prompt, "prompt"), "prompt")
        return _conversational(messages, _reply(chosen, "chosen"), _reply(rejected, "rejected")), \
            "conversational_explicit"
    if not isinstance(chosen, str) or not isinstance(rejected, str):
        if prompt is None:
            raise ValueError("without a prompt field, chosen and rejected must be full texts (strings) or whole "
                             "conversations (lists of messages)")
        raise ValueError("with a string prompt, chosen and rejected must be strings")
    chosen, rejected = _text(chosen, "chosen"), _text(rejected, "rejected")
    if prompt is not None:
        return PreferencePair(_text(prompt, "prompt"), chosen, rejected), "standard_explicit"
    return PreferencePair(*_split_implicit_prompt(chosen, rejected)), "standard_implicit"


def parse_row(row: Any) -> PreferencePair:
    """One row in any supported shape; ValueError with what is wrong and how to fix it."""
    return _parse_row(row)[0]


# ------------------------------------------------------------------------------------------ statistics


def _percentile(ordered: list[int], percent: int) -> int:
    """Nearest-rank percentile of a sorted, non-empty list: the smallest value with at least ``percent`` % of the
    values at or below it (integer arithmetic: 0.9 * 10 is not 9 in floating point)."""
    rank = max(1, (percent * len(ordered) + 99) // 100)
    return ordered[rank - 1]


def _distribution(values: array) -> dict[str, float | int]:
    ordered = sorted(values)
    if not ordered:
        return {}
    return {"min": ordered[0], "mean": round(sum(ordered) / len(ordered), 2), "p50": _percentile(ordered, 50),
            "p90": _percentile(ordered, 90), "p99": _percentile(ordered, 99), "max": ordered[-1]}


def _digest(prompt: str | tuple[Message, ...], *texts: str) -> int:
    """An 8-byte content hash (length-prefixed parts) of a prompt (text or messages) and responses."""
    parts = [prompt] if isinstance(prompt, str) else [text for message in prompt for text in message]
    digest = hashlib.blake2b(digest_size=8)
    digest.update(b"m" if not isinstance(prompt, str) else b"t")
    for text in [*parts, *texts]:
        encoded = text.encode("utf-8")
        digest.update(len(encoded).to_bytes(8, "little"))
        digest.update(encoded)
    return int.from_bytes(digest.digest(), "little")


def _repeats(digests: array) -> int:
    """How many entries equal an earlier one."""
    ordered = sorted(digests)
    return sum(1 for before, after in zip(ordered, ordered[1:], strict=False) if before == after)


class DatasetStats:
    """What a dataset's valid rows hold (the API stores it as ``datasets.stats``): rows per shape, conversational
    rows with a system turn or more than one user turn, duplicate rows and prompts, identical chosen/rejected,
    and the lengths in characters of prompt (its plain rendering), chosen and rejected.

    Memory is 40 bytes per row (three lengths, an 8-byte hash of the row and one of its prompt, in arrays): a
    200 MB upload of 250-byte rows holds 32 MB, and the sorts at the end as much again."""

    def __init__(self) -> None:
        self.shapes: Counter[str] = Counter()
        self.system_turns = 0
        self.multi_turn = 0
        self.identical = 0
        self._row_digests = array("Q")
        self._prompt_digests = array("Q")
        self._lengths = {"prompt": array("q"), "chosen": array("q"), "rejected": array("q")}

    def add(self, pair: PreferencePair, shape: str) -> None:
        self.shapes[shape] += 1
        if pair.messages is not None:
            self.system_turns += int(pair.messages[0][0] == "system")
            self.multi_turn += int(sum(role == "user" for role, _ in pair.messages) > 1)
        self.identical += int(not pair.carries_preference)
        prompt = pair.messages if pair.messages is not None else pair.prompt
        self._row_digests.append(_digest(prompt, pair.chosen, pair.rejected))
        self._prompt_digests.append(_digest(prompt))
        for field, lengths in self._lengths.items():
            lengths.append(len(getattr(pair, field)))

    def result(self) -> dict[str, Any]:
        return {
            "rows": len(self._row_digests),
            "shapes": {shape: self.shapes[shape] for shape in SHAPES if self.shapes[shape]},
            "system_turn_rows": self.system_turns,
            "multi_turn_rows": self.multi_turn,
            "duplicate_rows": _repeats(self._row_digests),
            "duplicate_prompts": _repeats(self._prompt_digests),
            "identical_pairs": self.identical,
            "length_chars": {field: _distribution(lengths) for field, lengths in self._lengths.items()},
        }


class _RowTally:
    """All-or-nothing bookkeeping over a stream of rows: counts them, keeps the first errors, the statistics
    and (when asked) the pairs."""

    def __init__(self, keep_pairs: bool) -> None:
        self.num_rows = 0
        self.pairs: list[PreferencePair] | None = [] if keep_pairs else None
        self.errors: list[RowError] = []
        self.total_errors = 0
        self.stats = DatasetStats()

    def add(self, number: int, row: Any) -> None:
        """``row`` is a decoded row, or the ValueError that says why its line could not be decoded."""
        try:
            if isinstance(row, ValueError):
                raise row
            pair, shape = _parse_row(row)
        except ValueError as error:
            self.total_errors += 1
            if len(self.errors) < MAX_REPORTED_ERRORS:
                self.errors.append(RowError(number, str(error)))
            if self.pairs is not None:
                self.pairs.clear()  # nothing will be returned; stop holding what was
            return
        self.num_rows += 1
        if not self.total_errors:  # past the first error nothing is returned: no statistics either
            self.stats.add(pair, shape)
            if self.pairs is not None:
                self.pairs.append(pair)

    def result(self) -> ValidatedDataset:
        if self.total_errors:
            raise DatasetError(f"{self.total_errors} invalid row(s); nothing was loaded", self.errors, self.total_errors)
        if not self.num_rows:
            raise DatasetError("the dataset has no rows")
        return ValidatedDataset(self.num_rows, self.pairs, self.stats.result())


def _not_utf8(offset: int) -> DatasetError:
    return DatasetError(f"the file is not UTF-8 text (byte {offset}); re-encode it as UTF-8")


# ------------------------------------------------------------------------------- streaming readers


class StreamingValidator(Protocol):
    def feed(self, chunk: bytes) -> None: ...

    def finish(self) -> ValidatedDataset: ...


class _JsonlRows:
    """JSONL fed in chunks of any size: each complete ``\\n``-terminated line is decoded and validated as it
    arrives, so at most one partial line is held. Line numbers count blank lines too."""

    def __init__(self, keep_pairs: bool) -> None:
        self._tally = _RowTally(keep_pairs)
        self._pending = bytearray()
        self._searched = 0  # bytes of _pending already known to hold no newline
        self._offset = 0  # file offset of _pending[0]
        self._line = 0

    def feed(self, chunk: bytes) -> None:
        self._pending += chunk
        start = 0
        while (end := self._pending.find(b"\n", max(start, self._searched))) >= 0:
            self._row(bytes(self._pending[start:end]), self._offset + start)
            start = end + 1
        del self._pending[:start]
        self._offset += start
        self._searched = len(self._pending)

    def finish(self) -> ValidatedDataset:
        if self._pending:
            self._row(bytes(self._pending), self._offset)
            self._pending.clear()
        return self._tally.result()

    def _row(self, line: bytes, offset: int) -> None:
        self._line += 1
        if offset == 0 and line.startswith(_BOM):
            line, offset = line[len(_BOM):], len(_BOM)
        if not line.strip():
            return
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as error:
            raise _not_utf8(offset + error.start) from None
        try:
            row: Any = json.loads(text)
        except json.JSONDecodeError as error:
            row = ValueError(f"invalid JSON ({error.msg} at column {error.colno})")
        self._tally.add(self._line, row)


_NOT_A_ROW_LIST = "a JSON dataset must be a list of rows (or an object with a 'data' list)"
_WHITESPACE = " \t\n\r"


class _NeedMore(Exception):
    """The text decoded so far ends inside the next token: wait for the next chunk."""


class _JsonRows:
    """A JSON document fed in chunks: a list of rows, or an object whose ``data`` key holds that list, decoded
    one element at a time with ``json.JSONDecoder.raw_decode``, so only the current row and one chunk are in
    memory (other keys of the object are decoded whole and dropped).

    A value that fails to decode may just be cut by the chunk boundary, so it is retried once the unread text
    has doubled (a huge row costs linear, not quadratic, time). It is a real syntax error once a retry fails
    with the same message at the same place; only an unterminated string may still be a long string in transit.
    """

    def __init__(self, keep_pairs: bool) -> None:
        self._tally = _RowTally(keep_pairs)
        self._utf8 = codecs.getincrementaldecoder("utf-8-sig")()  # -sig: a leading BOM is dropped
        self._decoder = json.JSONDecoder()
        self._text = ""  # decoded text not yet consumed, from _pos on
        self._pos = 0
        self._bytes_fed = 0
        self._lines_dropped = 0  # newlines in the text already dropped, and the columns after the last one,
        self._column_dropped = 0  # so that errors name the document's line and column
        self._chars_dropped = 0
        self._retry_at = 0  # length of _text before the state machine runs again
        self._last_failure: tuple[int, str] | None = None
        self._final = False
        self._state = "document"
        self._in_object = False
        self._key: Any = None
        self._data_lists = 0
        self._data_is_not_a_list = False
        self._row_number = 0

    def feed(self, chunk: bytes) -> None:
        buffered = len(self._utf8.getstate()[0])
        try:
            text = self._utf8.decode(chunk)
        except UnicodeDecodeError as error:
            raise _not_utf8(self._bytes_fed - buffered + error.start) from None
        self._bytes_fed += len(chunk)
        self._drop_consumed()
        self._text += text
        if len(self._text) >= self._retry_at:
            self._advance()

    def finish(self) -> ValidatedDataset:
        buffered = len(self._utf8.getstate()[0])
        try:
            self._text += self._utf8.decode(b"", final=True)
        except UnicodeDecodeError as error:
            raise _not_utf8(self._bytes_fed - buffered + error.start) from None
        self._final = True
        self._advance()
        if self._state != "done":
            self._syntax_error(len(self._text), "the document ends before its list or object is closed")
        if self._data_lists == 0 or self._data_is_not_a_list:
            raise DatasetError(_NOT_A_ROW_LIST)
        return self._tally.result()

    # -- the state machine: each step consumes one token at _pos, or raises _NeedMore

    def _advance(self) -> None:
        try:
            while self._state != "done" or self._pos < len(self._text):
                getattr(self, f"_on_{self._state}")()
        except _NeedMore:
            # At least MIN_RETRY_GROWTH more characters: enough to complete any token but a string or a long number.
            self._retry_at = len(self._text) + max(len(self._text) - self._pos, MIN_RETRY_GROWTH)

    def _char(self) -> str:
        """The next non-whitespace character (skipping to it, not consuming it)."""
        while self._pos < len(self._text) and self._text[self._pos] in _WHITESPACE:
            self._pos += 1
        if self._pos == len(self._text):
            raise _NeedMore  # at the end of the document, finish() reports where it stopped
        return self._text[self._pos]

    def _value(self) -> Any:
        self._char()
        try:
            value, end = self._decoder.raw_decode(self._text, self._pos)
        except json.JSONDecodeError as error:
            failure = (self._chars_dropped + error.pos, error.msg)  # a document position, stable across drops
            if self._final or (failure == self._last_failure and not error.msg.startswith("Unterminated string")):
                self._syntax_error(error.pos, error.msg)
            self._last_failure = failure
            raise _NeedMore from None
        if not self._final and self._may_go_on(value, end):
            # "12" then "3" or "12." then "5": wait for more, once; if the number still ends here, it is done
            # and whatever follows it is the next token's business.
            failure = (self._chars_dropped + end, "a number may go on")
            if failure != self._last_failure:
                self._last_failure = failure
                raise _NeedMore
        self._pos, self._last_failure = end, None
        return value

    def _may_go_on(self, value: Any, end: int) -> bool:
        if end == len(self._text):
            return True
        is_number = isinstance(value, int | float) and not isinstance(value, bool)
        return is_number and self._text[end] in ".eE+-"

    def _expect(self, allowed: str, what: str) -> str:
        char = self._char()
        if char not in allowed:
            if self._state == "document":
                raise DatasetError(_NOT_A_ROW_LIST)
            self._syntax_error(self._pos, f"Expecting {what}")
        self._pos += 1
        return char

    def _on_document(self) -> None:
        self._in_object = self._expect("[{", "'[' or '{'") == "{"
        self._state = "first_key" if self._in_object else "first_row"

    def _on_first_key(self) -> None:
        if self._char() == "}":
            self._pos += 1
            self._state = "done"
        else:
            self._state = "key"

    def _on_key(self) -> None:
        if self._char() != '"':
            self._syntax_error(self._pos, "Expecting property name enclosed in double quotes")
        self._key = self._value()
        self._state = "colon"

    def _on_colon(self) -> None:
        self._expect(":", "':' delimiter")
        self._state = "member"

    def _on_member(self) -> None:
        if self._key == "data" and self._char() == "[":
            self._data_lists += 1
            if self._data_lists > 1:
                raise DatasetError("the JSON object has more than one 'data' key; keep one list of rows")
            self._pos += 1
            self._state = "first_row"
            return
        self._value()  # any other member is decoded whole and dropped
        if self._key == "data":
            self._data_is_not_a_list = True
        self._state = "after_member"

    def _on_after_member(self) -> None:
        self._state = "key" if self._expect(",}", "',' delimiter") == "," else "done"

    def _on_first_row(self) -> None:
        if self._char() == "]":
            self._pos += 1
            self._rows_done()
        else:
            self._state = "row"

    def _on_row(self) -> None:
        row = self._value()
        self._row_number += 1
        self._tally.add(self._row_number, row)
        self._state = "after_row"

    def _on_after_row(self) -> None:
        if self._expect(",]", "',' delimiter") == ",":
            self._state = "row"
        else:
            self._rows_done()

    def _rows_done(self) -> None:
        if not self._in_object:
            self._data_lists = 1
        self._state = "after_member" if self._in_object else "done"

    def _on_done(self) -> None:
        self._char()
        self._syntax_error(self._pos, "Extra data")

    # -- bookkeeping

    def _drop_consumed(self) -> None:
        """Drop the consumed text, remembering its lines and columns for error positions."""
        if not self._pos:
            return
        newlines = self._text.count("\n", 0, self._pos)
        if newlines:
            self._lines_dropped += newlines
            self._column_dropped = self._pos - self._text.rfind("\n", 0, self._pos) - 1
        else:
            self._column_dropped += self._pos
        self._text = self._text[self._pos:]
        self._chars_dropped += self._pos
        self._retry_at -= self._pos
        self._pos = 0

    def _syntax_error(self, pos: int, message: str) -> None:
        line = self._lines_dropped + self._text.count("\n", 0, pos) + 1
        last_newline = self._text.rfind("\n", 0, pos)
        column = pos - last_newline if last_newline >= 0 else self._column_dropped + pos + 1
        raise DatasetError(f"invalid JSON at line {line} column {column}: {message}")


def streaming_validator(file_format: str, *, keep_pairs: bool = True) -> StreamingValidator:
    """A validator to ``feed()`` a ``.jsonl`` or ``.json`` file's bytes in chunks of any size, then ``finish()``."""
    readers: dict[str, type[_JsonlRows] | type[_JsonRows]] = {".jsonl": _JsonlRows, ".json": _JsonRows}
    reader = readers.get(file_format.lower())
    if reader is None:
        raise DatasetError(f"{file_format!r} cannot be validated as a stream; stream .jsonl or .json, "
                           "or read .parquet with validate_file")
    return reader(keep_pairs)


def _validate_parquet(source: str | Path | BinaryIO, keep_pairs: bool) -> ValidatedDataset:
    """Parquet needs random access, so it is read from its file: in record batches of PARQUET_BATCH_ROWS
    rows, with buffered reads of its pages instead of whole column chunks at once (``pre_buffer=False``), so
    memory is a batch of rows and a page per column, not the file."""
    try:
        import pyarrow.parquet as parquet
    except ImportError as error:
        raise DatasetError("reading Parquet needs pyarrow; install it with: pip install pyarrow") from error
    tally = _RowTally(keep_pairs)
    try:
        table = parquet.ParquetFile(source, buffer_size=READ_CHUNK, pre_buffer=False)
        batches = table.iter_batches(batch_size=PARQUET_BATCH_ROWS, use_threads=False)
        number = 0
        for batch in batches:
            for row in batch.to_pylist():
                number += 1
                tally.add(number, row)
    except Exception as error:  # pyarrow raises its own exception types for corrupt files
        raise DatasetError(f"not a readable Parquet file: {error}") from error
    return tally.result()


def _check_format(file_format: str) -> str:
    if file_format.lower() not in FORMATS:
        raise DatasetError(f"unsupported dataset format {file_format!r}; use .jsonl, .json or .parquet (or a "
                           "Hugging Face datasets folder written by save_to_disk)")
    return file_format.lower()


# ---------------------------------------------------------------------- Hugging Face datasets folders

DATASET_DICT_FILE = "dataset_dict.json"  # what DatasetDict.save_to_disk writes; Dataset.save_to_disk: state.json
DATASET_STATE_FILE = "state.json"


def is_datasets_folder(path: str | Path) -> bool:
    """Whether ``path`` is a folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    path = Path(path)
    return path.is_dir() and ((path / DATASET_DICT_FILE).is_file() or (path / DATASET_STATE_FILE).is_file())


def datasets_folder_splits(path: str | Path) -> list[str] | None:
    """The splits of a saved ``DatasetDict``, or None for a saved ``Dataset`` (read from its JSON, no import)."""
    index = Path(path) / DATASET_DICT_FILE
    if not index.is_file():
        return None
    try:
        splits = json.loads(index.read_text(encoding="utf-8"))["splits"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DatasetError(f"{index} is not a readable DatasetDict index ({error}); save the dataset again with "
                           "save_to_disk") from None
    return [str(split) for split in splits]


def _datasets_folder_rows(path: Path, split: str | None, split_field: str) -> Iterator[Any]:
    """The rows of a ``save_to_disk`` folder, memory-mapped: one row at a time in memory. ``split_field`` is the
    spec field that names the split, for the errors."""
    splits = datasets_folder_splits(path)
    if splits is None:
        if split is not None:
            raise DatasetError(f"{path} holds one Dataset (no splits), so {split_field} {split!r} does not apply; "
                               f"leave {split_field} out")
        folder = path
    else:
        if split is None:
            if len(splits) != 1:
                raise DatasetError(f"{path} is a DatasetDict with splits {', '.join(splits)}; choose one with "
                                   f"{split_field}")
            split = splits[0]
        elif split not in splits:
            raise DatasetError(f"{path} has no split {split!r} ({split_field}); its splits are {', '.join(splits)}")
        folder = path / split
    try:
        # datasets imports no torch by itself (tests/test_boundaries.py checks ctpd_core.data stays torch-free).
        from datasets import load_from_disk
    except ImportError as error:
        raise DatasetError("reading a Hugging Face datasets folder needs the datasets package; install it with: "
                           "pip install datasets") from error
    try:
        dataset = load_from_disk(str(folder))
    except Exception as error:  # datasets raises FileNotFoundError, its own errors, or Arrow's on a corrupt folder
        raise DatasetError(f"{folder} is not a readable datasets folder ({error}); save it again with "
                           "save_to_disk") from error
    yield from dataset


def _validate_rows(rows: Iterable[Any], keep_pairs: bool) -> ValidatedDataset:
    tally = _RowTally(keep_pairs)
    for number, row in enumerate(rows, 1):
        tally.add(number, row)
    return tally.result()


# ------------------------------------------------------------------------------------------- loading


def validate_file(path: str | Path, file_format: str | None = None, *, keep_pairs: bool = True,
                  split: str | None = None, split_field: str = "dataset.split") -> ValidatedDataset:
    """Validate a file on disk, reading it in chunks (``file_format`` defaults to the path's suffix), or a
    ``datasets`` folder written by ``save_to_disk`` (``split`` chooses a DatasetDict's split)."""
    path = Path(path)
    if file_format is None and is_datasets_folder(path):
        return _validate_rows(_datasets_folder_rows(path, split, split_field), keep_pairs)
    if split is not None:
        raise DatasetError(f"{split_field} {split!r} applies to a Hugging Face datasets folder, and {path} is a "
                           f"file; leave {split_field} out")
    file_format = _check_format(file_format or path.suffix)
    if file_format == ".parquet":
        return _validate_parquet(path, keep_pairs)
    validator = streaming_validator(file_format, keep_pairs=keep_pairs)
    with path.open("rb") as handle:
        while chunk := handle.read(READ_CHUNK):
            validator.feed(chunk)
    return validator.finish()


def parse_pairs(data: bytes, file_format: str) -> list[PreferencePair]:
    """Validate a whole file's bytes; ``file_format`` is ``.jsonl``, ``.json`` or ``.parquet``."""
    file_format = _check_format(file_format)
    if file_format == ".parquet":
        dataset = _validate_parquet(io.BytesIO(data), keep_pairs=True)
    else:
        validator = streaming_validator(file_format)
        validator.feed(data)
        dataset = validator.finish()
    assert dataset.pairs is not None  # keep_pairs=True
    return dataset.pairs


def load_pairs(path: str | Path, split: str | None = None, *, split_field: str = "dataset.split") -> list[PreferencePair]:
    """The training pairs of a dataset (the worker's loader): a file read in chunks, or a ``datasets`` folder
    (``split`` chooses a DatasetDict's split), validated row by row. Rows whose chosen and rejected are
    identical carry no preference and are left out (logged; the statistics count them)."""
    path = Path(path)
    if not path.is_file() and not is_datasets_folder(path):
        if path.is_dir():
            found = ("is a folder, but not one written by save_to_disk (no dataset_dict.json or state.json); name "
                     "the .jsonl, .json or .parquet file itself")
        else:
            found = "does not exist; name the .jsonl, .json or .parquet file, or a save_to_disk folder"
        raise DatasetError(f"dataset {path} {found}")
    pairs = validate_file(path, split=split, split_field=split_field).pairs
    assert pairs is not None  # keep_pairs=True
    kept = [pair for pair in pairs if pair.carries_preference]
    if len(kept) < len(pairs):
        logger.warning("dataset %s: %d of %d rows have identical chosen and rejected responses and are left out",
                       path, len(pairs) - len(kept), len(pairs))
    if not kept:
        raise DatasetError(f"dataset {path}: every row has identical chosen and rejected responses, so none "
                           "carries a preference; give each row two different responses")
    return kept


# An impossible text length: marks the messages that follow a pair's texts (a standard pair has none), so a
# conversational pair never hashes like a standard one and the encoding stays prefix-free.
_MESSAGES_MARK = (2**64 - 1).to_bytes(8, "little")


def pairs_fingerprint(pairs: Iterable[PreferencePair]) -> str:
    """sha256 of the pairs' content (independent of the file format they came in); a conversational pair's
    messages are part of it, so changing a turn (or its role) changes the prepare stage's key."""
    digest = hashlib.sha256()
    for pair in pairs:
        for text in (pair.prompt, pair.chosen, pair.rejected):
            encoded = text.encode("utf-8")
            digest.update(len(encoded).to_bytes(8, "little"))
            digest.update(encoded)
        if pair.messages is not None:
            digest.update(_MESSAGES_MARK)
            digest.update(len(pair.messages).to_bytes(8, "little"))
            for role, content in pair.messages:
                for text in (role, content):
                    encoded = text.encode("utf-8")
                    digest.update(len(encoded).to_bytes(8, "little"))
                    digest.update(encoded)
    return digest.hexdigest()
