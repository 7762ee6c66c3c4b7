"""The driver: ``python -m bench.quality [--quick | --scale cpu|quick|gpu] [--seeds ...] [--publish]``.

For every seed: a seeded sample of the examples training pairs; every method trained on it as a job
(``worker.recipe.run_spec``, one stage cache for all of them, so the teacher's reference pass and the π±
models are built once per seed and shared by the jobs that need them); each result, the initial student, the
initial teacher and the teacher's π+ measured on the held-out material (``measure``). Each measurement is
stored as it is made (``<out>/measurements/<row>-seed<N>.json``), so an interrupted run picks up where it
stopped; the report (``<out>/results.md``, ``results.json``, the reward-KL plot) is rewritten after every
seed. ``--publish`` copies it to ``docs/`` (docs/results.md is the published table).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from bench.quality.config import (
    METHODS,
    SCALES,
    STUDENT_ROW,
    TEACHER_POSITIVE_ROW,
    TEACHER_ROW,
    Scale,
)
from bench.quality.heldout import (
    REPO,
    VALIDATION_FILE,
    build_eval_set,
    heldout_prompts,
    training_subset,
    validation_pairs,
)
from bench.quality.report import PLOT_NAME
from ctpd_core.observe import NullObserver

DOCS = REPO / "docs"


def shared_spec(scale: Scale, seed: int, train_file: Path) -> dict[str, Any]:
    """The JobSpec fields every method and grid point shares (the benchmark's and the frontier's)."""
    return {
        "student": {"model": scale.student},
        "dataset": {"path": str(train_file), "validation_path": str(VALIDATION_FILE)},
        "beta": scale.beta,
        "contrastive": {"learning_rate": scale.contrastive_learning_rate, "epochs": scale.epochs},
        "training": {
            "learning_rate": scale.learning_rate, "epochs": scale.epochs, "batch_size": scale.batch_size,
            "micro_batch_size": scale.micro_batch_size, "seed": seed, "precision": scale.precision,
        },
        "sequence": {"max_prompt_tokens": scale.max_prompt_tokens, "max_response_tokens": scale.max_response_tokens},
        "evaluation": {"max_pairs": scale.job_validation_pairs},
    }


def job_spec(scale: Scale, method: str, seed: int, train_file: Path) -> dict[str, Any]:
    """The JobSpec (as a mapping) of one method and seed. Every method shares all hyperparameters."""
    fields = next(f for key, _, f in METHODS if key == method)
    spec: dict[str, Any] = {
        **fields,
        **shared_spec(scale, seed, train_file),
        "name": f"bench-quality {method} seed {seed}",
        "metadata": {"bench": "quality", "scale": scale.name, "seed": str(seed)},
    }
    if fields["method"] == "ctpd":
        spec["teacher"] = {"model": scale.teacher}
    return spec


class _StageLog(NullObserver):
    """An observer that prints one line per stage and keeps each stage's summary."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.summaries: dict[str, dict[str, Any]] = {}

    def stage_finished(self, stage: str, seconds: float, cached: bool, summary) -> None:
        self.summaries[stage] = dict(summary)
        print(f"  [{self.label}] {stage}: {'cached' if cached else f'{seconds:.1f} s'}", flush=True)


class MeasurementStore:
    """One JSON file per (row, seed), tagged with the scale's fingerprint: a file from other settings is
    ignored (and overwritten), so changing the scale never mixes measurements."""

    def __init__(self, folder: Path, fingerprint: str) -> None:
        self.folder, self.fingerprint = folder, fingerprint
        folder.mkdir(parents=True, exist_ok=True)

    def _path(self, row: str, seed: int | None) -> Path:
        return self.folder / (f"{row}.json" if seed is None else f"{row}-seed{seed}.json")

    def get(self, row: str, seed: int | None) -> dict[str, Any] | None:
        path = self._path(row, seed)
        if not path.exists():
            return None
        stored = json.loads(path.read_text(encoding="utf-8"))
        return stored if stored.get("fingerprint") == self.fingerprint else None

    def put(self, row: str, seed: int | None, measurement: dict[str, Any]) -> None:
        path = self._path(row, seed)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({**measurement, "fingerprint": self.fingerprint, "row": row, "seed": seed}),
                       encoding="utf-8")
        tmp.replace(path)


class Bench:
    def __init__(self, scale: Scale, out: Path, device, catalog: Path) -> None:
        import torch

        from bench.quality.measure import vader_scorer
        from bench.quality.sampling import SamplingConfig
        from ctpd_core.models import load_causal_lm

        self.scale, self.out, self.device, self.catalog = scale, out, torch.device(device), catalog
        self.numerics = scale.numerics(self.device.type)
        self.store = MeasurementStore(out / "measurements", scale.fingerprint(self.device.type))
        self.reward = vader_scorer()
        self.sampling = SamplingConfig(
            num_samples=scale.samples_per_prompt, max_new_tokens=scale.max_new_tokens, seed=scale.sampling_seed,
            batch_size=scale.sampling_batch_size,
        )
        self._load = load_causal_lm
        prompts = heldout_prompts(scale.eval_prompts)
        pairs = validation_pairs(scale.validation_pairs)
        self.models: dict[str, tuple[Any, Any]] = {}
        self.initial_pairs: dict[str, Any] = {}  # family -> the initial model's held-out pair log-probs
        self.eval_sets = {}
        for family, name in (("student", scale.student), ("teacher", scale.teacher)):
            model, tokenizer = self.load(name)
            self.models[family] = (model, tokenizer)
            self.eval_sets[family] = build_eval_set(
                tokenizer, prompts, pairs, max_prompt_tokens=scale.max_prompt_tokens,
                max_response_tokens=scale.max_response_tokens,
            )

    def load(self, reference: str) -> tuple[Any, Any]:
        model, tokenizer = self._load(reference, cache_dir=self.catalog)
        model.to(self.device).eval().requires_grad_(False)
        return model, tokenizer

    def measure(self, row: str, seed: int | None, family: str, model: Any | None, extra: dict[str, Any]) -> dict:
        """Measure ``model`` (None: the family's initial model) unless it is stored already."""
        from bench.quality.measure import measure_model, pair_logprob_sums
        from ctpd_core.inference import pad_token_id

        stored = self.store.get(row, seed)
        if stored is not None:
            return stored
        initial, tokenizer = self.models[family]
        started = time.monotonic()
        if model is not None and family not in self.initial_pairs:
            self.initial_pairs[family] = pair_logprob_sums(
                initial, self.eval_sets[family], pad_id=pad_token_id(tokenizer),
                batch_size=self.scale.inference_batch_size, device=self.device, precision=self.scale.precision,
            )
        measurement = measure_model(
            initial if model is None else model, tokenizer, None if model is None else initial,
            self.eval_sets[family], self.sampling, reward=self.reward, batch_size=self.scale.inference_batch_size,
            device=self.device, precision=self.scale.precision, initial_pairs=self.initial_pairs.get(family),
        )
        measurement.update(extra, family=family, measure_seconds=round(time.monotonic() - started, 1))
        self.store.put(row, seed, measurement)
        print(f"  [{row} seed {seed}] reward {measurement['reward']:+.4f}  kl {measurement['kl']:.3f}  "
              f"bpb {measurement['bits_per_byte']:.4f}  pref_acc {measurement['preference_accuracy']:.3f}  "
              f"({measurement['measure_seconds']} s)", flush=True)
        return measurement

    def train(self, method: str, seed: int, train_file: Path) -> tuple[Any, _StageLog]:
        from ctpd_core.spec import JobSpec
        from worker.recipe import RunContext, run_spec

        spec = JobSpec.model_validate(job_spec(self.scale, method, seed, train_file))
        log = _StageLog(f"{method} seed {seed}")
        context = RunContext(
            artifact_root=self.out / "artifacts", run_dir=self.out / "runs" / f"{method}-seed{seed}",
            model_cache=self.catalog, device=self.device, observer=log,
            inference_batch_size=self.scale.inference_batch_size,
        )
        result = run_spec(spec, context)
        if result.status != "succeeded":
            raise RuntimeError(f"the {method} job for seed {seed} ended {result.status}")
        return result, log

    def run_seed(self, seed: int) -> None:
        train_file = training_subset(self.scale.train_pairs, seed, self.out / "data" / f"train-seed{seed}.jsonl")
        for method in self.scale.methods:
            stored = self.store.get(method, seed)
            if stored is None:
                started = time.monotonic()
                result, log = self.train(method, seed, train_file)
                job = {"job_seconds": round(time.monotonic() - started, 1), "stage_seconds": result.stage_seconds,
                       "cached_stages": result.cached_stages, "job_metrics": result.metrics,
                       "export_dir": str(result.export_dir),
                       "contrastive_positive": log.summaries.get("contrastive", {}).get("positive")}
                model, _ = self.load(str(result.export_dir))
                stored = self.measure(method, seed, "student", model, job)
                del model
            if method == "ctpd" and self.store.get(TEACHER_POSITIVE_ROW[0], seed) is None:
                # The teacher's π+ that produced the ctpd weights (the ceiling), from the stage cache.
                positive = stored.get("contrastive_positive")
                if not positive or not Path(positive).exists():
                    raise RuntimeError(
                        f"the π+ model of seed {seed} ({positive}) is gone from the stage cache; delete "
                        f"{self.store.folder}/ctpd-seed{seed}.json to train and measure ctpd again"
                    )
                teacher_positive, _ = self.load(positive)
                self.measure(TEACHER_POSITIVE_ROW[0], seed, "teacher", teacher_positive, {"model_dir": positive})
                del teacher_positive

    def run(self, command: str | None = None) -> dict[str, Any]:
        from bench.quality.report import write_report

        command = command or f"python -m bench.quality --scale {self.scale.name}"

        started = time.monotonic()
        self.measure(STUDENT_ROW[0], None, "student", None, {})
        self.measure(TEACHER_ROW[0], None, "teacher", None, {})
        for seed in self.scale.seeds:
            print(f"seed {seed}", flush=True)
            self.run_seed(seed)
            write_report(self.scale, self.store, self.out, command=command, wall_seconds=time.monotonic() - started,
                         numerics=self.numerics)
        return write_report(self.scale, self.store, self.out, command=command,
                            wall_seconds=time.monotonic() - started, numerics=self.numerics)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", choices=sorted(SCALES), default="cpu", help="cpu (default, ~80 min on 2 cores), "
                        "quick (one seed, tiny: under 15 min), gpu (one GPU, bf16)")
    parser.add_argument("--quick", action="store_const", const="quick", dest="scale", help="same as --scale quick")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="training seeds (default: the scale's)")
    parser.add_argument("--out", type=Path, default=None,
                        help="working folder (default $CTPD_HOME/bench/quality/<scale>); rerunning resumes from it")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite the report from the stored measurements; train and measure nothing")
    parser.add_argument("--publish", action="store_true",
                        help="copy results.md and the plot to docs/ (docs/results.md is the published table)")
    args = parser.parse_args(argv)

    import torch

    scale = SCALES[args.scale]
    if args.seeds:
        scale = dataclasses.replace(scale, seeds=tuple(args.seeds))
    home = Path(os.environ.get("CTPD_HOME", ".ctpd")).expanduser()  # as the ctpd CLI (nothing imports ctpd_cli)
    out = args.out or home / "bench" / "quality" / scale.name
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if scale.precision == "bf16" and not str(device).startswith("cuda"):
        parser.error(f"the {scale.name} scale runs in bf16 on a GPU; no CUDA device here (use --scale cpu)")
    print(f"bench.quality: scale {scale.name}, seeds {list(scale.seeds)}, device {device}, "
          f"threads {torch.get_num_threads()}, out {out}", flush=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # What regenerates the numbers: the arguments as given, less --report-only (which only rewrites the report).
    given = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--report-only"]
    command = " ".join(["python -m bench.quality", *given])
    if args.report_only:
        from bench.quality.report import write_report

        device_type = torch.device(device).type
        store = MeasurementStore(out / "measurements", scale.fingerprint(device_type))
        report = write_report(scale, store, out, command=command, wall_seconds=0.0, numerics=scale.numerics(device_type))
    else:
        report = Bench(scale, out, device, home / "catalog").run(command)
    if args.publish:
        from bench.quality.frontier_report import frontier_section, splice_section

        DOCS.mkdir(exist_ok=True)
        # The frontier sweep (bench.quality.frontier) publishes its own section into the same page: kept.
        published = DOCS / "results.md"
        section = frontier_section(published.read_text(encoding="utf-8")) if published.exists() else None
        text = (out / "results.md").read_text(encoding="utf-8")
        published.write_text(splice_section(text, section) if section else text, encoding="utf-8")
        shutil.copyfile(out / PLOT_NAME, DOCS / PLOT_NAME)
        print(f"published {DOCS / 'results.md'} and {DOCS / PLOT_NAME}")
    print(report["markdown"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
