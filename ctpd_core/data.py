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
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MAX_REPORTED_ERRORS = 20


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


def _text_of_message(value: Any, field: str) -> str:
    if isinstance(value, list):
        if len(value) != 1:
            raise ValueError(f"{field} must hold exactly one assistant message, not {len(value)}")
        value = value[0]
    if not isinstance(value, dict) or not isinstance(value.get("content"), str):
        raise ValueError(f"{field} must be a string or an assistant message {{'role': ..., 'content': str}}")
    return value["content"]


def _conversational_prompt(messages: Any) -> str:
    if not isinstance(messages, list) or not messages:
        raise ValueError("prompt must be a string or a non-empty list of messages")
    if len(messages) != 1 or not isinstance(messages[0], dict) or messages[0].get("role") != "user":
        raise ValueError("only single-turn conversations are supported: prompt must be one user message")
    content = messages[0].get("content")
    if not isinstance(content, str):
        raise ValueError("the user message's content must be a string")
    return content


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
        if not isinstance(chosen, str) or not isinstance(rejected, str):
            raise ValueError("without a prompt field, chosen and rejected must be full texts (strings)")
        prompt, chosen, rejected = _split_implicit_prompt(chosen, rejected)
    if not chosen.strip():
        raise ValueError("chosen is empty; remove the row or give the preferred response")
    if not rejected.strip():
        raise ValueError("rejected is empty; remove the row or give the dispreferred response")
    if chosen == rejected:
        raise ValueError("chosen and rejected are identical, so the pair carries no preference; remove the row")
    return PreferencePair(prompt=prompt, chosen=chosen, rejected=rejected)


def _rows_jsonl(data: bytes) -> Iterator[tuple[int, Any]]:
    for number, line in enumerate(data.decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as error:
            yield number, ValueError(f"invalid JSON ({error.msg} at column {error.colno})")


def _rows_json(data: bytes) -> Iterator[tuple[int, Any]]:
    try:
        document = json.loads(data.decode("utf-8"))
    except json.JSONDecodeError as error:
        raise DatasetError(f"invalid JSON at line {error.lineno} column {error.colno}: {error.msg}") from error
    if isinstance(document, dict) and isinstance(document.get("data"), list):
        document = document["data"]
    if not isinstance(document, list):
        raise DatasetError("a JSON dataset must be a list of rows (or an object with a 'data' list)")
    yield from enumerate(document, start=1)


def _rows_parquet(data: bytes) -> Iterator[tuple[int, Any]]:
    import io

    try:
        import pyarrow.parquet as parquet
    except ImportError as error:
        raise DatasetError("reading Parquet needs pyarrow; install it with: pip install pyarrow") from error
    try:
        table = parquet.read_table(io.BytesIO(data))
    except Exception as error:  # pyarrow raises its own exception types for corrupt files
        raise DatasetError(f"not a readable Parquet file: {error}") from error
    yield from enumerate(table.to_pylist(), start=1)


READERS = {".jsonl": _rows_jsonl, ".json": _rows_json, ".parquet": _rows_parquet}


def parse_pairs(data: bytes, file_format: str) -> list[PreferencePair]:
    """Validate a whole file's bytes; ``file_format`` is ``.jsonl``, ``.json`` or ``.parquet``."""
    reader = READERS.get(file_format.lower())
    if reader is None:
        raise DatasetError(f"unsupported dataset format {file_format!r}; use .jsonl, .json or .parquet")
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        rows = list(reader(data))
    except UnicodeDecodeError as error:
        raise DatasetError(f"the file is not UTF-8 text (byte {error.start}); re-encode it as UTF-8") from error
    return _validated(rows)


def _validated(rows: Iterable[tuple[int, Any]]) -> list[PreferencePair]:
    pairs, errors, total_errors = [], [], 0
    for number, row in rows:
        try:
            if isinstance(row, Exception):
                raise row
            pairs.append(parse_row(row))
        except ValueError as error:
            total_errors += 1
            if len(errors) < MAX_REPORTED_ERRORS:
                errors.append(RowError(number, str(error)))
    if total_errors:
        raise DatasetError(f"{total_errors} invalid row(s); nothing was loaded", errors, total_errors)
    if not pairs:
        raise DatasetError("the dataset has no rows")
    return pairs


def load_pairs(path: str | Path) -> list[PreferencePair]:
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"dataset file {path} does not exist")
    return parse_pairs(path.read_bytes(), path.suffix)


def pairs_fingerprint(pairs: Iterable[PreferencePair]) -> str:
    """sha256 of the pairs' content (independent of the file format they came in)."""
    digest = hashlib.sha256()
    for pair in pairs:
        for text in (pair.prompt, pair.chosen, pair.rejected):
            encoded = text.encode("utf-8")
            digest.update(len(encoded).to_bytes(8, "little"))
            digest.update(encoded)
    return digest.hexdigest()
