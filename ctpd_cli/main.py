"""The ``ctpd`` command. Each subcommand imports only what it needs, so ``ctpd --help`` stays fast."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

logger = logging.getLogger("ctpd_cli")


def ctpd_home() -> Path:
    """``$CTPD_HOME`` (default ``./.ctpd``): artifacts, the catalog cache, the embedded database."""
    return Path(os.environ.get("CTPD_HOME", ".ctpd")).expanduser()


def catalog_cache() -> Path:
    return ctpd_home() / "catalog"


def _cmd_align(args: argparse.Namespace) -> int:
    from ctpd_core.alignment import align_texts
    from ctpd_core.models import load_tokenizer

    text = sys.stdin.read() if args.text in (None, "-") else args.text
    student = load_tokenizer(args.student, cache_dir=catalog_cache(), role="student tokenizer")
    teacher = load_tokenizer(args.teacher, cache_dir=catalog_cache(), role="teacher tokenizer")
    (alignment,) = align_texts(student, teacher, [text])
    document = alignment.to_json()
    if args.json:
        print(json.dumps(document, ensure_ascii=False))
        return 0
    student_ids = student(text, add_special_tokens=False)["input_ids"]
    teacher_ids = teacher(text, add_special_tokens=False)["input_ids"]
    # Escape control characters so a token such as "\n\n" does not break the table.
    student_pieces = [json.dumps(p, ensure_ascii=False)[1:-1] for p in student.convert_ids_to_tokens(student_ids)]
    teacher_pieces = [json.dumps(p, ensure_ascii=False)[1:-1] for p in teacher.convert_ids_to_tokens(teacher_ids)]
    rows = [("span", "bytes", "text", "student tokens", "teacher tokens")]
    for index, span in enumerate(document["spans"]):
        rows.append(
            (
                str(index),
                f"{span['start']}-{span['end']}",
                repr(span["text"]),
                " ".join(student_pieces[i] for i in span["student"]),
                " ".join(teacher_pieces[i] for i in span["teacher"]),
            )
        )
    widths = [max(len(row[column]) for row in rows) for column in range(4)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row[:4], widths, strict=True)) + "  " + row[4])
    stats = document["stats"]
    print(
        f"\n{stats['spans']} spans; student {stats['student_tokens']} tokens, teacher {stats['teacher_tokens']} tokens; "
        + ", ".join(f"{name} {stats['share_' + name]:.1%}" for name in ("1:1", "1:n", "n:1", "n:m"))
        + " (teacher:student)"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ctpd", description="Cross-Tokenizer Preference Distillation")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    commands = parser.add_subparsers(dest="command", required=True)

    align = commands.add_parser(
        "align",
        help="show the aligned spans of a text under a student and a teacher tokenizer",
        description="TOK is a catalog model name (see `ctpd models list`), a Hugging Face folder or a tokenizer.json.",
    )
    align.add_argument("--student", required=True, metavar="TOK")
    align.add_argument("--teacher", required=True, metavar="TOK")
    align.add_argument("--json", action="store_true", help="print the alignment as one JSON document")
    align.add_argument("text", nargs="?", help="the response text ('-' or nothing: read standard input)")
    align.set_defaults(handler=_cmd_align)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from ctpd_core.alignment import AlignmentError, TokenizerOffsetsError
    from ctpd_core.models import ModelLoadError

    try:
        return args.handler(args)
    except (ModelLoadError, AlignmentError, TokenizerOffsetsError, ValueError) as error:
        print(f"ctpd {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
