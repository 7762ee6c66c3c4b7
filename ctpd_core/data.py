"""Preference datasets: reading and validating (prompt, chosen, rejected) rows. Torch-free.

Accepted files: JSONL (one object per line), JSON (a list of objects, or ``{"data": [...]}``) and Parquet,
in TRL's preference formats:

* explicit prompt: ``{"prompt": str, "chosen": str, "rejected": str}`` (``prompt + chosen`` is the full text);
* implicit prompt: ``{"chosen": str, "rejected": str}``, full texts sharing a prefix; the prompt is the
  longest common prefix, cut back to the last whitespace so no word is split;
* conversational: ``prompt`` a list of ``{"role", "content"}`` messages ending with one user turn, and
  ``chosen`` / ``rejected`` a single assistant message each (or a list holding one). Only single-turn
  conversations are supported; the user turn is the prompt (render it with ``prompt_format: chat_template``).

Validation is all-or-nothing and row-level: every bad row is reported with its line (JSONL) or row number,
and nothing is returned if any row is bad, so a caller never stores half a dataset.

One row validator (:func:`parse_row`) serves every caller. The files are read as streams, so memory is one
chunk plus the longest row, not the file: the worker's loader (:func:`load_pairs`) reads its file in
chunks and keeps only the pairs, and the API's upload feeds a :func:`streaming_validator` the request body
as it arrives and keeps nothing (``keep_pairs=False``). JSONL is split on ``\\n``; JSON is decoded one
element of its row list at a time (:class:`_JsonRows`); Parquet, which needs random access, is read from
its file in record batches (:func:`validate_file`).
"""

from __future__ import annotations

import codecs
import hashlib
import io
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

MAX_REPORTED_ERRORS = 20
READ_CHUNK = 1 << 20
PARQUET_BATCH_ROWS = 1024
MIN_RETRY_GROWTH = 64  # characters
FORMATS = (".jsonl", ".json", ".parquet")
_BOM = b"\xef\xbb\xbf"
# json.loads joins an escaped surrogate pair ("\ud83d\ude00") into one character, so any surrogate left in
# a decoded string is a lone one: not Unicode text, and it cannot be encoded as UTF-8 (the tokenizers do).
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True)
class PreferencePair:
    prompt: str
    chosen: str
    rejected: str


@dataclass(frozen=True)
class RowError:
    row: int  # 1-based line (JSONL) or row number (JSON, Parquet)
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


def _text_of_message(value: Any, field: str) -> str:
    if isinstance(value, list):
        if len(value) != 1:
            raise ValueError(f"{field} must hold exactly one assistant message, not {len(value)}")
        value = value[0]
    if not isinstance(value, dict) or not isinstance(value.get("content"), str):
        raise ValueError(f"{field} must be a string or an assistant message {{'role': ..., 'content': str}}")
    return _text(value["content"], f"{field}'s content")


def _conversational_prompt(messages: Any) -> str:
    if not isinstance(messages, list) or not messages:
        raise ValueError("prompt must be a string or a non-empty list of messages")
    if len(messages) != 1 or not isinstance(messages[0], dict) or messages[0].get("role") != "user":
        raise ValueError("only single-turn conversations are supported: prompt must be one user message")
    content = messages[0].get("content")
    if not isinstance(content, str):
        raise ValueError("the user message's content must be a string")
    return _text(content, "the user message's content")


def _split_implicit_prompt(chosen: str, rejected: str) -> tuple[str, str, str]:
    common = 0
    for a, b in zip(chosen, rejected, strict=False):
        if a != b:
            break
        common += 1
    cut = max(chosen.rfind(" ", 0, common), chosen.rfind("\n", 0, common))
    cut = cut if cut > 0 else 0
    return chosen[:cut], chosen[cut:], rejected[cut:]


def parse_row(row: Any) -> PreferencePair:
    """One row in any supported format; ValueError with what is wrong and how to fix it."""
    if not isinstance(row, dict):
        raise ValueError(f"expected an object with prompt/chosen/rejected, got {type(row).__name__}")
    missing = [key for key in ("chosen", "rejected") if key not in row]
    if missing:
        raise ValueError(f"missing field(s) {', '.join(missing)}; each row needs chosen and rejected (and usually prompt)")
    chosen, rejected = row["chosen"], row["rejected"]
    if "prompt" in row:
        prompt = row["prompt"]
        if not isinstance(prompt, str):
            prompt = _conversational_prompt(prompt)
            chosen, rejected = _text_of_message(chosen, "chosen"), _text_of_message(rejected, "rejected")
        elif not isinstance(chosen, str) or not isinstance(rejected, str):
            raise ValueError("with a string prompt, chosen and rejected must be strings")
        else:
            prompt, chosen, rejected = _text(prompt, "prompt"), _text(chosen, "chosen"), _text(rejected, "rejected")
    else:
        if not isinstance(chosen, str) or not isinstance(rejected, str):
            raise ValueError("without a prompt field, chosen and rejected must be full texts (strings)")
        prompt, chosen, rejected = _split_implicit_prompt(_text(chosen, "chosen"), _text(rejected, "rejected"))
    if not chosen.strip():
        raise ValueError("chosen is empty; remove the row or give the preferred response")
    if not rejected.strip():
        raise ValueError("rejected is empty; remove the row or give the dispreferred response")
    if chosen == rejected:
        raise ValueError("chosen and rejected are identical, so the pair carries no preference; remove the row")
    return PreferencePair(prompt=prompt, chosen=chosen, rejected=rejected)


class _RowTally:
    """All-or-nothing bookkeeping over a stream of rows: counts them, keeps the first errors, and (when asked)
    the pairs; memory is constant with ``keep_pairs=False``."""

    def __init__(self, keep_pairs: bool) -> None:
        self.num_rows = 0
        self.pairs: list[PreferencePair] | None = [] if keep_pairs else None
        self.errors: list[RowError] = []
        self.total_errors = 0

    def add(self, number: int, row: Any) -> None:
        """``row`` is a decoded row, or the ValueError that says why its line could not be decoded."""
        try:
            if isinstance(row, ValueError):
                raise row
            pair = parse_row(row)
        except ValueError as error:
            self.total_errors += 1
            if len(self.errors) < MAX_REPORTED_ERRORS:
                self.errors.append(RowError(number, str(error)))
            if self.pairs is not None:
                self.pairs.clear()  # nothing will be returned; stop holding what was
            return
        self.num_rows += 1
        if self.pairs is not None and not self.total_errors:
            self.pairs.append(pair)

    def result(self) -> ValidatedDataset:
        if self.total_errors:
            raise DatasetError(f"{self.total_errors} invalid row(s); nothing was loaded", self.errors, self.total_errors)
        if not self.num_rows:
            raise DatasetError("the dataset has no rows")
        return ValidatedDataset(self.num_rows, self.pairs)


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
        raise DatasetError(f"unsupported dataset format {file_format!r}; use .jsonl, .json or .parquet")
    return file_format.lower()


def validate_file(path: str | Path, file_format: str | None = None, *, keep_pairs: bool = True) -> ValidatedDataset:
    """Validate a file on disk, reading it in chunks; ``file_format`` defaults to the path's suffix."""
    path = Path(path)
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


def load_pairs(path: str | Path) -> list[PreferencePair]:
    """The pairs of a dataset file (the worker's loader): read in chunks, validated row by row."""
    path = Path(path)
    if not path.is_file():
        found = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise DatasetError(f"dataset file {path} {found}; name the .jsonl, .json or .parquet file itself")
    pairs = validate_file(path).pairs
    assert pairs is not None  # keep_pairs=True
    return pairs


def pairs_fingerprint(pairs: Iterable[PreferencePair]) -> str:
    """sha256 of the pairs' content (independent of the file format they came in)."""
    digest = hashlib.sha256()
    for pair in pairs:
        for text in (pair.prompt, pair.chosen, pair.rejected):
            encoded = text.encode("utf-8")
            digest.update(len(encoded).to_bytes(8, "little"))
            digest.update(encoded)
    return digest.hexdigest()
