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


class _ConsoleObserver:
    """Draws one progress bar per stage and prints each stage's wall time (the local `ctpd run`)."""

    def __init__(self) -> None:
        self.bar = None
        self.stage = None

    def stage_started(self, stage: str, cached: bool) -> None:
        self.stage = stage
        if cached:
            print(f"[{stage}] cached: reusing the stored output")

    def progress(self, progress) -> None:
        from tqdm import tqdm

        if self.bar is None or self.bar.desc != progress.stage:
            self._close()
            self.bar = tqdm(total=progress.total, desc=progress.stage, unit="step", dynamic_ncols=True, leave=True)
        self.bar.total = progress.total
        self.bar.n = progress.step
        self.bar.refresh()

    def metrics(self, stage: str, step: int, metrics) -> None:
        if self.bar is not None and "loss" in metrics:
            shown = {k: f"{metrics[k]:.3g}" for k in ("loss", "reward_accuracy", "reward_margin") if k in metrics}
            self.bar.set_postfix(shown, refresh=True)

    def checkpoint(self, stage: str, step: int, path) -> None:
        pass

    def stage_finished(self, stage: str, seconds: float, cached: bool, summary) -> None:
        self._close()
        print(f"[{stage}] done in {seconds:.1f} s")

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _cmd_run(args: argparse.Namespace) -> int:
    import torch

    from ctpd_core.artifacts import content_key
    from ctpd_core.spec import load_spec
    from worker.recipe import RunContext, run_spec

    spec = load_spec(args.spec, args.set)
    artifacts = Path(args.artifacts) if args.artifacts else ctpd_home() / "artifacts"
    run_dir = artifacts / "runs" / content_key(spec.model_dump(mode="json"))[:16]
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    print(f"ctpd run: method {spec.method}, student {spec.student.model}"
          + (f", teacher {spec.teacher.model}" if spec.teacher else "") + f", device {device}, run folder {run_dir}")
    context = RunContext(
        artifact_root=artifacts, run_dir=run_dir, model_cache=catalog_cache(), device=device,
        observer=_ConsoleObserver(),
    )
    result = run_spec(spec, context)
    print(_result_table(result))
    return 0 if result.status == "succeeded" else 1


def _result_table(result) -> str:
    lines = ["", "evaluation (held-out pairs)", "-" * 44]
    for name, value in result.metrics.items():
        lines.append(f"{name:<34}{value:>10.4f}" if isinstance(value, float) else f"{name:<34}{value:>10}")
    lines += ["", "stage wall times", "-" * 44]
    for stage, seconds in result.stage_seconds.items():
        cached = " (cached)" if stage in result.cached_stages else ""
        lines.append(f"{stage:<34}{seconds:>9.1f}s{cached}")
    lines += ["", f"status: {result.status}", f"model: {result.export_dir}"]
    return "\n".join(lines)


def _cmd_models(args: argparse.Namespace) -> int:
    from ctpd_core.models import CATALOG, resolve_model_folder

    if args.models_command == "list":
        for entry in CATALOG.values():
            cached = (catalog_cache() / entry.name / "model" / "config.json").exists()
            print(f"{entry.name:<24} {entry.description}")
            print(f"{'':<24} tokenizer: {entry.tokenizer_kind}; licence: {entry.license}")
            print(f"{'':<24} package: {entry.install}; converted: {'yes' if cached else 'no (first use converts it)'}")
        return 0
    if args.name not in CATALOG:
        raise ValueError(f"{args.name!r} is not in the catalog; `ctpd models list` shows the names")
    folder = resolve_model_folder(args.name, cache_dir=catalog_cache())
    print(f"{args.name}: {folder}")
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

    run = commands.add_parser("run", help="run a whole distillation job locally, in this process")
    run.add_argument("spec", help="a job spec, YAML or JSON (see examples/)")
    run.add_argument("--artifacts", help="artifact root (default: $CTPD_HOME/artifacts)")
    run.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    run.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="override a spec field, e.g. --set method=dpo --set training.max_steps=4 (repeatable)",
    )
    run.set_defaults(handler=_cmd_run)

    models = commands.add_parser("models", help="the catalog of packaged models")
    models_commands = models.add_subparsers(dest="models_command", required=True)
    models_commands.add_parser("list", help="list the catalog")
    model_import = models_commands.add_parser("import", help="convert a catalog model now (otherwise its first use does)")
    model_import.add_argument("name")
    models.set_defaults(handler=_cmd_models)
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
