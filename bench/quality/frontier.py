"""The frontier sweep: ``python -m bench.quality.frontier [--quick | --scale quick|cpu|gpu] [--seeds ...]
[--publish]``.

For every seed and grid point (config.py: FRONTIER_METHODS, FRONTIER_BETAS, FRONTIER_LR_FACTORS): the job is
trained through ``worker.recipe.run_spec`` with one stage cache for the whole sweep, so that a seed's reference
passes, π± models and weights are built once and reused by every β; the trained student is measured on every
held-out source (``measure``: VADER reward of sampled continuations, KL from the initial student); each
measurement is stored at once as a small JSON file in the repository, ``bench/quality/measurements/<scale>/
<source>/<point>-seed<N>.json`` (per-sample rewards and KLs, the job's stage times; no sample texts), tagged with
the fingerprint of everything it depends on. A rerun, here or on another machine with the committed files,
skips what is stored under the same fingerprint and measures again what was stored under another. The report
(``frontier_report``) is rewritten after every seed; ``--publish`` writes its section into docs/results.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from bench.quality.config import FRONTIER_SCALES, FrontierPoint, FrontierScale
from bench.quality.heldout import (
    HELDOUT_SOURCES,
    REPO,
    build_eval_set,
    prompts_digest,
    training_subset,
    validation_pairs,
)
from bench.quality.run import _StageLog, shared_spec

MEASUREMENTS = Path(__file__).resolve().parent / "measurements"
UNTRAINED_ROWS = ("student", "teacher")  # measured once per scale and source, not per seed
_KEEP = ("reward", "kl", "kl_per_token", "bits_per_byte", "preference_accuracy", "likelihood_accuracy",
         "mean_tokens", "ended_share", "distinct_2")


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``extra`` laid over it, nested mappings merged key by key."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def frontier_job_spec(scale: FrontierScale, point: FrontierPoint, seed: int, train_file: Path) -> dict[str, Any]:
    """The JobSpec (as a mapping) of one grid point and seed: the benchmark's shared fields with the point's
    method, β or learning rate laid over them; the teacher for the methods that read it."""
    from ctpd_core.spec import TEACHER_METHODS

    spec = _merge(shared_spec(scale.base, seed, train_file), point.spec_fields(scale.base))
    spec["name"] = f"bench-quality frontier {point.key} seed {seed}"
    spec["metadata"] = {"bench": "quality-frontier", "scale": scale.name, "point": point.key, "seed": str(seed)}
    if spec["method"] in TEACHER_METHODS:
        spec["teacher"] = {"model": scale.base.teacher}
    return spec


def torch_threads() -> int:
    import torch

    return int(torch.get_num_threads())


def point_row(point: FrontierPoint, seed: int) -> str:
    return f"{point.key}-seed{seed}"


def source_ids(scale: FrontierScale) -> dict[str, str]:
    """Each source's identity in the fingerprints: its name, the hash of the prompts drawn from it and, where
    its measurement scores the held-out pairs, how many. Text work only: no models."""
    ids = {}
    for key in scale.sources:
        source = HELDOUT_SOURCES[key]
        ident = f"{key}:{prompts_digest(source.prompts(scale.base.eval_prompts))}"
        ids[key] = ident + (f":pairs{scale.base.validation_pairs}" if source.pairs else "")
    return ids


class FrontierStore:
    """One JSON file per (source, row): ``<folder>/<source>/<row>.json``, where a row is a grid point and seed
    (``dpo-beta0.1-seed0``) or an untrained model (``student``). Each holds the fingerprint it was measured under;
    :meth:`get` with another fingerprint finds nothing, so changed settings never mix (the old file is
    overwritten when the row is measured again)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def path(self, source: str, row: str) -> Path:
        return self.folder / source / f"{row}.json"

    def get(self, source: str, row: str, fingerprint: str) -> dict[str, Any] | None:
        path = self.path(source, row)
        if not path.exists():
            return None
        stored = json.loads(path.read_text(encoding="utf-8"))
        return stored if stored.get("fingerprint") == fingerprint else None

    def seeds(self, source: str, point_key: str) -> list[int]:
        """The seeds stored for a grid point on a source (under any fingerprint)."""
        found = []
        for path in (self.folder / source).glob(f"{point_key}-seed*.json"):
            suffix = path.stem[len(point_key) + len("-seed"):]
            if suffix.isdigit():
                found.append(int(suffix))
        return sorted(found)

    def log_run(self, entry: dict[str, Any]) -> None:
        """Append one run's command, seeds and wall time to ``<folder>/runs.jsonl`` (the report shows them)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with (self.folder / "runs.jsonl").open("a", encoding="utf-8") as log:
            log.write(json.dumps(entry, sort_keys=True) + "\n")

    def runs(self) -> list[dict[str, Any]]:
        path = self.folder / "runs.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def put(self, source: str, row: str, fingerprint: str, record: dict[str, Any]) -> None:
        path = self.path(source, row)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        text = json.dumps({**record, "fingerprint": fingerprint, "row": row, "source": source}, sort_keys=True)
        tmp.write_text(text + "\n", encoding="utf-8")
        tmp.replace(path)


def small_record(measurement: dict[str, Any]) -> dict[str, Any]:
    """What is committed of one measurement: the summary numbers and the per-sample rewards and KLs (rounded:
    VADER gives 4 decimals, a KL needs no more than 5); never the sample texts."""
    record = {key: measurement[key] for key in _KEEP if key in measurement}
    record["rewards"] = [[round(float(r), 4) for r in row] for row in measurement["rewards"]]
    record["kls"] = [[round(float(k), 5) for k in row] for row in measurement["kls"]]
    return record


class FrontierBench:
    def __init__(self, scale: FrontierScale, out: Path, device: Any, catalog: Path,
                 store: FrontierStore | None = None, *, keep_models: bool = False) -> None:
        import torch

        from bench.quality.measure import vader_scorer
        from bench.quality.sampling import SamplingConfig
        from ctpd_core.models import load_causal_lm

        self.created = time.monotonic()  # a run's wall time counts the model loads here too
        base = scale.base
        self.scale, self.out, self.device, self.catalog = scale, out, torch.device(device), catalog
        self.device_type = self.device.type
        self.numerics = base.numerics(self.device_type)
        self.store = store or FrontierStore(MEASUREMENTS / scale.name)
        self.keep_models = keep_models
        self.reward = vader_scorer()
        self.sampling = SamplingConfig(num_samples=base.samples_per_prompt, max_new_tokens=base.max_new_tokens,
                                       seed=base.sampling_seed, batch_size=base.sampling_batch_size)
        self._load = load_causal_lm
        self.source_ids = source_ids(scale)
        pairs = validation_pairs(base.validation_pairs)
        self.models: dict[str, tuple[Any, Any]] = {}
        self.eval_sets: dict[tuple[str, str], Any] = {}  # (family, source) -> EvalSet
        self.initial_pairs: dict[str, Any] = {}  # source -> the initial student's held-out pair log-probs
        for family, name in (("student", base.student), ("teacher", base.teacher)):
            model, tokenizer = self.load(name)
            self.models[family] = (model, tokenizer)
            for key in scale.sources:
                source = HELDOUT_SOURCES[key]
                self.eval_sets[family, key] = build_eval_set(
                    tokenizer, source.prompts(base.eval_prompts), pairs if source.pairs else [],
                    max_prompt_tokens=base.max_prompt_tokens, max_response_tokens=base.max_response_tokens,
                )

    def load(self, reference: str) -> tuple[Any, Any]:
        model, tokenizer = self._load(reference, cache_dir=self.catalog)
        model.to(self.device).eval().requires_grad_(False)
        return model, tokenizer

    def fingerprint(self, row: str | dict, source: str) -> str:
        return self.scale.fingerprint(self.device_type, row, self.source_ids[source])

    def measure(self, source: str, family: str, model: Any | None) -> dict[str, Any]:
        """``model`` (None: the family's initial model) on one source, as a small record."""
        from bench.quality.measure import measure_model, pair_logprob_sums
        from ctpd_core.inference import pad_token_id

        base = self.scale.base
        initial, tokenizer = self.models[family]
        eval_set = self.eval_sets[family, source]
        started = time.monotonic()
        if model is not None and eval_set.pair_prompt_ids and source not in self.initial_pairs:
            self.initial_pairs[source] = pair_logprob_sums(
                initial, eval_set, pad_id=pad_token_id(tokenizer), batch_size=base.inference_batch_size,
                device=self.device, precision=base.precision,
            )
        measurement = measure_model(
            initial if model is None else model, tokenizer, None if model is None else initial, eval_set,
            self.sampling, reward=self.reward, batch_size=base.inference_batch_size, device=self.device,
            precision=base.precision, initial_pairs=self.initial_pairs.get(source),
        )
        return {**small_record(measurement), "measure_seconds": round(time.monotonic() - started, 1)}

    def measure_untrained(self) -> None:
        for source in self.scale.sources:
            for family in UNTRAINED_ROWS:
                fingerprint = self.fingerprint(family, source)
                if self.store.get(source, family, fingerprint) is None:
                    record = self.measure(source, family, None)
                    self.store.put(source, family, fingerprint, {**record, "family": family})
                    print(f"  [{family} on {source}] reward {record['reward']:+.4f} ({record['measure_seconds']} s)",
                          flush=True)

    def train(self, point: FrontierPoint, seed: int, train_file: Path) -> tuple[Any, float]:
        from ctpd_core.spec import JobSpec
        from worker.recipe import RunContext, run_spec

        spec = JobSpec.model_validate(frontier_job_spec(self.scale, point, seed, train_file))
        context = RunContext(
            artifact_root=self.out / "artifacts", run_dir=self.out / "runs" / point_row(point, seed),
            model_cache=self.catalog, device=self.device, observer=_StageLog(point_row(point, seed)),
            inference_batch_size=self.scale.base.inference_batch_size,
        )
        started = time.monotonic()
        result = run_spec(spec, context)
        if result.status != "succeeded":
            raise RuntimeError(f"the {point.key} job for seed {seed} ended {result.status}")
        return result, time.monotonic() - started

    def run_point(self, point: FrontierPoint, seed: int, train_file: Path) -> None:
        """Train and measure one grid point, unless every source has it stored."""
        row = point_row(point, seed)
        fields = point.spec_fields(self.scale.base)
        fingerprints = {source: self.fingerprint(fields, source) for source in self.scale.sources}
        missing = [s for s in self.scale.sources if self.store.get(s, row, fingerprints[s]) is None]
        if not missing:
            return
        result, job_seconds = self.train(point, seed, train_file)
        job = {"method": point.method, "knob": point.knob, "value": point.value, "seed": seed, "spec_fields": fields,
               "job_seconds": round(job_seconds, 1),
               "stage_seconds": {k: round(v, 2) for k, v in result.stage_seconds.items()},
               "cached_stages": result.cached_stages, "job_metrics": result.metrics}
        model, _ = self.load(str(result.export_dir))
        for source in missing:
            record = self.measure(source, "student", model)
            self.store.put(source, row, fingerprints[source], {**record, **job})
            print(f"  [{row} on {source}] reward {record['reward']:+.4f}  kl {record['kl']:.3f}  "
                  f"({job['job_seconds']} s job, {record['measure_seconds']} s measure)", flush=True)
        del model
        if not self.keep_models:  # the export and its checkpoints: ~0.3-0.5 GB per point, measured now
            shutil.rmtree(self.out / "runs" / row, ignore_errors=True)

    def is_complete(self, seed: int) -> bool:
        """Whether every point of ``seed`` is stored on every source under this run's settings."""
        return all(
            self.store.get(source, point_row(p, seed), self.fingerprint(p.spec_fields(self.scale.base), source))
            is not None
            for p in self.scale.points() for source in self.scale.sources
        )

    def seeds_to_run(self) -> list[int]:
        """The scale's seeds, or, with ``seeds_per_run``, the first that many not yet complete."""
        seeds = list(self.scale.seeds)
        if self.scale.seeds_per_run is None:
            return seeds
        return [s for s in seeds if not self.is_complete(s)][: self.scale.seeds_per_run]

    def run(self, command: str | None = None, *, seeds: list[int] | None = None) -> dict[str, Any]:
        """Measure the untrained models and every point of ``seeds`` (default :meth:`seeds_to_run`) that is not
        stored yet; the report is rewritten after every seed."""
        from bench.quality.frontier_report import write_report

        command = command or f"python -m bench.quality.frontier --scale {self.scale.name}"
        started = time.monotonic()
        self.measure_untrained()
        seeds = self.seeds_to_run() if seeds is None else seeds
        print(f"seeds this run: {seeds or 'none (every seed of the scale is stored)'}", flush=True)
        for seed in seeds[:-1]:  # the report after each seed; the last one's is the returned one
            self.run_seed(seed)
            write_report(self.scale, self.store, self.out, device_type=self.device_type, command=command,
                         wall_seconds=time.monotonic() - started, ids=self.source_ids)
        if seeds:
            self.run_seed(seeds[-1])
        self.store.log_run({
            "command": command, "seeds": seeds, "wall_seconds": round(time.monotonic() - self.created, 1),
            "date": time.strftime("%Y-%m-%d"), "numerics": self.numerics, "machine": platform.machine(),
            "threads": torch_threads(),
        })
        return write_report(self.scale, self.store, self.out, device_type=self.device_type, command=command,
                            wall_seconds=time.monotonic() - started, ids=self.source_ids)

    def run_seed(self, seed: int) -> None:
        print(f"seed {seed}", flush=True)
        train_file = training_subset(self.scale.base.train_pairs, seed, self.out / "data" / f"train-seed{seed}.jsonl")
        for point in self.scale.points():
            self.run_point(point, seed, train_file)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.quality.frontier", description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", choices=sorted(FRONTIER_SCALES), default="cpu",
                        help="cpu (default: one seed per run, ~90 min on 2 cores), quick (under 15 min), gpu (one GPU)")
    parser.add_argument("--quick", action="store_const", const="quick", dest="scale", help="same as --scale quick")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="training seeds to run (default: the scale's next seeds_per_run seeds not yet stored); "
                        "the report covers every seed stored, so seeds accumulate across runs and machines")
    parser.add_argument("--out", type=Path, default=None,
                        help="working folder for the stage cache and jobs (default $CTPD_HOME/bench/quality/"
                        "frontier-<scale>)")
    parser.add_argument("--store", type=Path, default=None,
                        help="measurement folder (default bench/quality/measurements/<scale>, committed)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--keep-models", action="store_true", help="keep each trained student's export")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite the report from the stored measurements; train and measure nothing")
    parser.add_argument("--publish", action="store_true",
                        help="write the report's Frontier section and plot into docs/ (the rest of results.md stays)")
    args = parser.parse_args(argv)

    import torch

    scale = FRONTIER_SCALES[args.scale]
    home = Path(os.environ.get("CTPD_HOME", ".ctpd")).expanduser()  # as the ctpd CLI (nothing imports ctpd_cli)
    out = args.out or home / "bench" / "quality" / f"frontier-{scale.name}"
    store = FrontierStore(args.store or MEASUREMENTS / scale.name)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if scale.base.precision == "bf16" and not str(device).startswith("cuda"):
        parser.error(f"the {scale.name} scale runs in bf16 on a GPU; no CUDA device here (use --scale cpu)")
    print(f"bench.quality.frontier: scale {scale.name}, seeds {args.seeds or list(scale.seeds)}"
          + (f" ({scale.seeds_per_run} per run)" if scale.seeds_per_run and not args.seeds else "")
          + f", {len(scale.points())} points, "
          f"device {device}, threads {torch.get_num_threads()}, store {store.folder}, out {out}", flush=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    given = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--report-only"]
    command = " ".join(["python -m bench.quality.frontier", *given])
    if args.report_only:
        from bench.quality.frontier_report import write_report

        report = write_report(scale, store, out, device_type=torch.device(device).type, command=command,
                              wall_seconds=0.0)
    else:
        bench = FrontierBench(scale, out, device, home / "catalog", store, keep_models=args.keep_models)
        report = bench.run(command, seeds=args.seeds)
    if args.publish:
        from bench.quality.frontier_report import publish

        publish(out, REPO / "docs")
    print(report["markdown"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
