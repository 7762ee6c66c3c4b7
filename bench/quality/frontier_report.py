"""The frontier's report: the Frontier section of results.md, frontier.json and the reward-against-KL plot.

Read from the measurement store alone (no models), so ``--report-only`` and a machine that only has the committed
measurements rebuild it exactly. docs/results.md keeps whatever else it holds: the section sits between two
markers and :func:`splice_section` replaces only that.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from bench.quality.config import (
    DSKD_TEMPERATURE,
    FRONTIER_BETAS,
    FRONTIER_LABELS,
    FRONTIER_LR_FACTORS,
    KD_KAPPA,
    FrontierPoint,
    FrontierScale,
)
from bench.quality.frontier_stats import NO_OVERLAP, MethodPoints, compare
from bench.quality.heldout import HELDOUT_SOURCES
from bench.quality.report import command_and_compute
from bench.quality.stats import prompt_standard_error, summarize

FRONTIER_PLOT = "results-frontier.png"
BEGIN = "<!-- frontier:begin (written by python -m bench.quality.frontier --publish; edits inside are replaced) -->"
END = "<!-- frontier:end -->"
# The paper's method against each of the others.
OURS = "ctpd"
COMPARED = ("dpo", "tisdpo", "ctpd_uniform", "sft", "uld", "dskd")
UNTRAINED_LABELS = {"student": "Student as is (SmolLM2-135M-Instruct)", "teacher": "Teacher as is (Gemma-3-270M)"}
RESAMPLES = 2000


def collect(scale: FrontierScale, store, *, device_type: str, ids: dict[str, str] | None = None) -> dict[str, Any]:
    """Every stored measurement of the scale whose fingerprint matches, whatever run or machine stored it:
    ``[source]["points"][point][seed]`` (every seed found) and ``[source]["untrained"][family]``."""
    from bench.quality.frontier import point_row, source_ids

    ids = ids or source_ids(scale)
    out: dict[str, Any] = {}
    for source in scale.sources:
        untrained = {}
        for family in UNTRAINED_LABELS:
            found = store.get(source, family, scale.fingerprint(device_type, family, ids[source]))
            if found is not None:
                untrained[family] = found
        points: dict[str, dict[int, dict[str, Any]]] = {}
        for point in scale.points():
            fingerprint = scale.fingerprint(device_type, point.spec_fields(scale.base), ids[source])
            for seed in store.seeds(source, point.key):
                found = store.get(source, point_row(point, seed), fingerprint)
                if found is not None:
                    points.setdefault(point.key, {})[seed] = found
        out[source] = {"untrained": untrained, "points": points}
    return out


def _method_points(scale: FrontierScale, method: str) -> list[FrontierPoint]:
    return [p for p in scale.points() if p.method == method]


def complete_seeds(scale: FrontierScale, measured: dict[str, Any], methods: tuple[str, ...]) -> list[int]:
    """The seeds under which every grid point of every one of ``methods`` is measured (on one source)."""
    keys = [p.key for m in methods for p in _method_points(scale, m)]
    seen = sorted({s for k in keys for s in measured["points"].get(k, {})})
    return [s for s in seen if all(s in measured["points"].get(k, {}) for k in keys)]


def method_points(scale: FrontierScale, measured: dict[str, Any], method: str, seeds: list[int]) -> MethodPoints:
    points = _method_points(scale, method)
    rows = [[measured["points"][p.key][s] for s in seeds] for p in points]
    return MethodPoints.from_samples([p.key for p in points], [[r["rewards"] for r in row] for row in rows],
                                     [[r["kls"] for r in row] for row in rows])


def summarize_points(scale: FrontierScale, measured: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Per method, each grid point's seed spread: reward, KL (mean ± std over its measured seeds), the noise floor
    of its mean reward (prompt standard error, averaged over seeds) and the secondary metrics."""
    out: dict[str, list[dict[str, Any]]] = {}
    for method in scale.methods:
        rows = []
        for point in _method_points(scale, method):
            by_seed = measured["points"].get(point.key, {})
            records = [by_seed[s] for s in sorted(by_seed)]
            if not records:
                continue
            accuracy = [r["preference_accuracy"] for r in records if r.get("preference_accuracy") is not None]
            rows.append({
                "point": point.key, "setting": point.describe(scale.base), "seeds": sorted(by_seed),
                "reward": summarize([r["reward"] for r in records]), "kl": summarize([r["kl"] for r in records]),
                "reward_se": float(np.mean([prompt_standard_error(r["rewards"]) for r in records])),
                "bits_per_byte": float(np.mean([r["bits_per_byte"] for r in records])),
                "preference_accuracy": float(np.mean(accuracy)) if accuracy else None,
                "job_seconds": float(np.mean([r.get("job_seconds", 0.0) for r in records])),
            })
        if rows:
            out[method] = rows
    return out


def compare_all(scale: FrontierScale, measured: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every pair of methods (``a|b``: a minus b) at matched KL, on the seeds where both have every point."""
    result = {}
    methods = list(scale.methods)
    for i, a in enumerate(methods):
        for b in methods[i + 1 :]:
            seeds = complete_seeds(scale, measured, (a, b))
            if not seeds:
                continue
            a_points, b_points = method_points(scale, measured, a, seeds), method_points(scale, measured, b, seeds)
            result[f"{a}|{b}"] = {**compare(a_points, b_points, resamples=RESAMPLES), "seed_list": seeds}
    return result


def oriented(comparisons: dict[str, Any], a: str, b: str) -> dict[str, Any] | None:
    """``a`` minus ``b``, whichever order the pair was computed in."""
    if f"{a}|{b}" in comparisons:
        return comparisons[f"{a}|{b}"]
    other = comparisons.get(f"{b}|{a}")
    if other is None:
        return None
    flipped = dict(other)
    if other["mean"] is not None:
        flipped.update(mean=-other["mean"], low=-other["high"], high=-other["low"],
                       verdict={"beat": "below", "below": "beat"}.get(other["verdict"], other["verdict"]))
    flipped["kl_range"] = list(reversed(other["kl_range"]))
    return flipped


def noise_floor(summaries: dict[str, list[dict[str, Any]]]) -> float:
    """The standard error of one mean reward, averaged over every trained point."""
    values = [row["reward_se"] for rows in summaries.values() for row in rows if not math.isnan(row["reward_se"])]
    return float(np.mean(values)) if values else math.nan


def _signed(value: float | None, digits: int = 3) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:+.{digits}f}"


def _spread(summary: dict[str, Any], digits: int = 3) -> str:
    if summary["n"] > 1:
        return f"{summary['mean']:.{digits}f} ± {summary['std']:.{digits}f}"
    return f"{summary['mean']:.{digits}f}"


def _verdict_sentence(label: str, c: dict[str, Any] | None) -> str:
    if c is None:
        return f"not measured against {label} yet"
    if c["verdict"] == NO_OVERLAP:
        (a_low, a_high), (b_low, b_high) = c["kl_range"]
        return (f"no overlap with {label}: CTPD's points span KL {a_low:.3f}-{a_high:.3f}, {label}'s "
                f"{b_low:.3f}-{b_high:.3f}, so there is no matched KL to compare at")
    word = {"beat": "beat", "below": "is below", "no detectable difference": "shows no detectable difference from"}
    share = "" if c["overlap_share"] >= 0.995 else (
        f"; the curves overlap in only {c['overlap_share']:.0%} of the bootstrap draws, and the interval is theirs")
    return (f"CTPD {word[c['verdict']]} {label}: {c['mean']:+.3f} reward at matched KL "
            f"(95 % interval [{c['low']:+.3f}, {c['high']:+.3f}], over KL {c['overlap'][0]:.3f}-{c['overlap'][1]:.3f}"
            f"{share})")


def _verdict_cell(c: dict[str, Any] | None) -> str:
    if c is None:
        return "not measured"
    if c["mean"] is None:
        return "no overlap"
    return (f"**{c['verdict']}** {c['mean']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}], KL "
            f"{c['overlap'][0]:.2f}-{c['overlap'][1]:.2f}")


def stage_table(measured_by_source: dict[str, Any], scale: FrontierScale) -> list[str]:
    """Mean stage times per method (first source's records: one per job), for sizing the next run."""
    first = measured_by_source[scale.sources[0]]
    stages = ["prepare", "reference", "contrastive", "weights", "distill", "evaluate", "export"]
    lines = ["| method | jobs | job s (mean) | " + " | ".join(f"{s} s" for s in stages) + " | measure s per source |",
             "|---|---|---|" + "---|" * len(stages) + "---|"]
    for method in scale.methods:
        records = [r for p in _method_points(scale, method) for r in first["points"].get(p.key, {}).values()]
        if not records:
            continue
        measure = [r2["measure_seconds"] for src in scale.sources for p in _method_points(scale, method)
                   for r2 in measured_by_source[src]["points"].get(p.key, {}).values()]
        cells = []
        for stage in stages:
            values = [r["stage_seconds"].get(stage) for r in records if stage in r.get("stage_seconds", {})]
            cells.append(f"{np.mean(values):.1f}" if values else "—")
        lines.append(f"| {FRONTIER_LABELS[method]} | {len(records)} | {np.mean([r['job_seconds'] for r in records]):.1f} | "
                     + " | ".join(cells) + f" | {np.mean(measure):.1f} |")
    return lines


def markdown(scale: FrontierScale, measured: dict[str, Any], analysis: dict[str, Any], *, command: str,
             wall_seconds: float, numerics: str, store_runs: list[dict[str, Any]] | None = None) -> str:
    base = scale.base
    records = [r for src in measured.values() for by_seed in src["points"].values() for r in by_seed.values()]
    untrained = [r for src in measured.values() for r in src["untrained"].values()]
    jobs = {(r["method"], r["value"], r["seed"]): r["job_seconds"] for r in records}
    compute = sum(jobs.values()) + sum(r["measure_seconds"] for r in records + untrained)
    seeds_seen = sorted({r["seed"] for r in records})
    steps = -(-base.train_pairs // base.batch_size)
    lines = [
        BEGIN,
        "## Frontier: reward against KL, and CTPD at matched KL",
        "",
    ]
    if scale.name == "quick":
        lines += ["> **This is the `--quick` smoke run** (one seed, two grid points per method, "
                  f"{base.eval_prompts} prompts per source, {steps} training steps): it shows that the sweep, the store "
                  "and the analysis work end to end on the real models. Its numbers are not a result; the verdicts "
                  "come from `--scale cpu` (or `gpu`), whose runs replace this section.", ""]
    lines += [
        f"Scale **{scale.name}**: {len(scale.points())} grid points per seed, seeds measured "
        f"{', '.join(map(str, seeds_seen)) or 'none yet'}; every trained student measured on "
        f"{len(scale.sources)} held-out sources. Regenerate with:",
        "",
        *command_and_compute(command, compute, wall_seconds, numerics,
                             "so resumes and measurements made on other machines count once"),
        "",
    ]
    runs = store_runs
    if runs:
        lines += ["Runs that trained and measured (wall time of each invocation, from the store's runs.jsonl):", ""]
        lines += [f"- {r['date']}: `{r['command']}`, seeds {r['seeds'] or 'none new'}, {r['wall_seconds'] / 60:.1f} min "
                  f"wall ({r['numerics']}, {r['machine']}, {r['threads']} threads)" for r in runs[-8:]]
        lines.append("")
    lines += [
        f"![reward against KL, one curve per method]({FRONTIER_PLOT})",
        "",
    ]
    lines += [
        "### Does CTPD win at matched KL?",
        "",
        "CTPD's reward minus the other method's, averaged over the KL range where both curves exist, with its 95 % "
        "bootstrap interval over seeds and prompts:",
        "",
        "| CTPD against | " + " | ".join(HELDOUT_SOURCES[s].label for s in scale.sources) + " |",
        "|---|" + "---|" * len(scale.sources),
    ]
    for other in (o for o in COMPARED if o in scale.methods and OURS in scale.methods):
        cells = [_verdict_cell(oriented(analysis[source]["comparisons"], OURS, other)) for source in scale.sources]
        lines.append(f"| {FRONTIER_LABELS[other]} | " + " | ".join(cells) + " |")
    lines.append("")
    for source in scale.sources:
        a = analysis[source]
        lines += [f"**{HELDOUT_SOURCES[source].label}** (seeds {', '.join(map(str, a['seeds'])) or 'none'}):", ""]
        lines += [f"- {_verdict_sentence(FRONTIER_LABELS[o], oriented(a['comparisons'], OURS, o))}."
                  for o in COMPARED if o in scale.methods and OURS in scale.methods]
        gaps = [abs(c["mean"]) for o in COMPARED if (c := oriented(a["comparisons"], OURS, o)) and c["mean"] is not None]
        floor = a["noise_floor"]
        if gaps and not math.isnan(floor):
            above = sum(g > floor for g in gaps)
            plain = ("it is below every gap" if above == len(gaps)
                     else f"it is **not below** {len(gaps) - above} of the {len(gaps)} gaps, so those differences are "
                     "within the noise of a single point")
            lines += ["", f"Noise floor: the standard error of one mean reward is {floor:.3f} ({base.eval_prompts} "
                      f"prompts × {base.samples_per_prompt} sample{'s' if base.samples_per_prompt > 1 else ''}); the matched-KL "
                      "gaps above are "
                      f"{min(gaps):.3f}-{max(gaps):.3f}: {plain}."]
        lines += _trust_caveats(a)
        lines.append("")
    lines += [
        "\"Beat\" means the 95 % bootstrap interval of the reward difference at matched KL lies above 0, \"below\" "
        "under 0; anything else is no detectable difference. The interval resamples seeds and prompts together "
        f"({RESAMPLES:,} draws) and recomputes each method's points, curves, overlap and average per draw.",
        "",
        "### Every pair at matched KL",
        "",
        "Row minus column: mean reward difference over the KL range where both curves exist, and the verdict "
        "(▲ beat, ▼ below, · no detectable difference, ∅ no overlap).",
        "",
    ]
    for source in scale.sources:
        comparisons = analysis[source]["comparisons"]
        methods = [m for m in scale.methods if m in analysis[source]["points"]]
        lines += [f"**{HELDOUT_SOURCES[source].label}**", "",
                  "| | " + " | ".join(FRONTIER_LABELS[m] for m in methods) + " |",
                  "|---|" + "---|" * len(methods)]
        for a_key in methods:
            cells = []
            for b_key in methods:
                c = oriented(comparisons, a_key, b_key) if a_key != b_key else None
                if c is None:
                    cells.append("")
                elif c["mean"] is None:
                    cells.append("∅")
                else:
                    mark = {"beat": "▲", "below": "▼"}.get(c["verdict"], "·")
                    cells.append(f"{mark} {c['mean']:+.3f}")
            lines.append(f"| {FRONTIER_LABELS[a_key]} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["### The points", "",
              "Mean ± standard deviation over seeds; SE: the standard error over prompts of one mean reward (the "
              "noise floor of a point). Untrained models have no seeds.", ""]
    for source in scale.sources:
        a = analysis[source]
        has_pairs = HELDOUT_SOURCES[source].pairs and base.validation_pairs > 0
        lines += [f"**{HELDOUT_SOURCES[source].label}**", "",
                  "| method | setting | seeds | reward | KL from the student (nats) | SE | bits/byte"
                  + (" | held-out pref. acc." if has_pairs else "") + " |",
                  "|---|---|---|---|---|---|---|" + ("---|" if has_pairs else "")]
        for family, record in measured[source]["untrained"].items():
            kl = "0" if family == "student" else "— (other tokenizer)"
            lines.append(f"| {UNTRAINED_LABELS[family]} | | | {record['reward']:.3f} | {kl} | "
                         f"{prompt_standard_error(record['rewards']):.3f} | {record['bits_per_byte']:.3f}"
                         + (" | 0.500" if has_pairs else "") + " |")
        for method, rows in a["points"].items():
            for row in rows:
                accuracy = row["preference_accuracy"]
                lines.append(
                    f"| {FRONTIER_LABELS[method]} | {row['setting']} | {len(row['seeds'])} | {_spread(row['reward'])} | "
                    f"{_spread(row['kl'])} | {row['reward_se']:.3f} | {row['bits_per_byte']:.3f}"
                    + (f" | {accuracy:.3f}" if has_pairs and accuracy is not None else (" | —" if has_pairs else ""))
                    + " |"
                )
        lines.append("")
    lines += ["### Stage times", "", "Per job, averaged over the stored jobs of each method (cached stages count their "
              "load time; π± and the references are built by the first job of a seed that needs them).", "",
              *stage_table(measured, scale), ""]
    lines += [
        "### How it was made",
        "",
        f"- The grid was fixed in `bench/quality/config.py` before any result: DPO, TIS-DPO, CTPD and CTPD-uniform "
        f"sweep β over {', '.join(f'{b:g}' for b in FRONTIER_BETAS)}; SFT, ULD and DSKD have no β and sweep the "
        f"learning rate over {', '.join(f'×{f:g}' for f in FRONTIER_LR_FACTORS)} the scale's {base.learning_rate:g} "
        f"(κ {KD_KAPPA:g} for ULD and DSKD, DSKD temperature {DSKD_TEMPERATURE:g}). "
        + (f"This scale runs β {', '.join(f'{b:g}' for b in scale.betas)} and learning-rate factors "
           f"{', '.join(f'×{f:g}' for f in scale.lr_factors)}." if scale.beta_methods_sweep == "beta" else
           f"This scale sweeps the learning rate for every method, over {', '.join(f'×{f:g}' for f in scale.lr_factors)}"
           f" at β {base.beta:g}: the quick run showed that β hardly moves KL at this training length, so a β sweep "
           "gives curves too short to meet at any KL (`BETA_BARELY_MOVES_KL` in bench/quality/config.py)."),
        "- **ULD uses `uld_alignment: span`**: the positions compared are those predicting the first token of each "
        "aligned span on both sides (both models read the same text there), not the paper's response position j "
        "against response position j.",
        f"- Everything else is shared by every method and point: a seeded sample of {base.train_pairs} of the 540 "
        f"training pairs per seed, {base.epochs:g} epoch at batch {base.batch_size} ({steps} optimizer steps), "
        f"learning rate {base.learning_rate:g} where not swept, β {base.beta:g} where not swept, π± at learning rate "
        f"{base.contrastive_learning_rate:g}, cosine schedule with 10 % warmup, AdamW, on {numerics}. Each job runs "
        "through `worker.recipe.run_spec` with one stage cache, so a seed's π± and reference passes are built once "
        "and every β reuses them.",
        f"- Held-out sources, {base.eval_prompts} prompts each, {base.samples_per_prompt} samples per prompt, at "
        f"most {base.max_new_tokens} new tokens, temperature 1, sampling seeds shared by every model:",
        *[f"  - {HELDOUT_SOURCES[s].label}: {HELDOUT_SOURCES[s].description}." for s in scale.sources],
        "- Reward: the VADER compound score of the continuation alone. KL: Σ over the sampled continuation's "
        "positions of the exact KL(model ‖ initial student), averaged over samples. The teacher has another "
        "tokenizer, so it has no KL from the student: the plot draws it as a line at its reward.",
        "- A curve joins a method's seed-averaged points in order of KL; reward at matched KL is linear between "
        "them, and no curve is extended past its own points (the untrained student is not a point of any curve).",
        "- Each measurement is stored as a small JSON file under `bench/quality/measurements/"
        f"{scale.name}/<source>/` (per-sample rewards and KLs, the job's stage times), tagged with a fingerprint of "
        "the settings; a rerun anywhere skips what is stored.",
        END,
    ]
    return "\n".join(lines)


def plot(scale: FrontierScale, measured: dict[str, Any], analysis: dict[str, Any], out_file: Path) -> None:
    """One panel per held-out source: each method's curve (seed-averaged points joined in order of KL, bars the
    spread over seeds, labels the β or learning-rate factor), the untrained student as a star at KL 0, the
    teacher's reward as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(scale.sources), figsize=(6.5 * len(scale.sources), 5.5), squeeze=False)
    for ax, source in zip(axes[0], scale.sources, strict=True):
        for index, method in enumerate(scale.methods):
            rows = analysis[source]["points"].get(method)
            if not rows:
                continue
            rows = sorted(rows, key=lambda r: r["kl"]["mean"])
            color = f"C{index}"
            kls, rewards = [r["kl"]["mean"] for r in rows], [r["reward"]["mean"] for r in rows]
            ax.errorbar(kls, rewards, xerr=[r["kl"]["std"] for r in rows], yerr=[r["reward"]["std"] for r in rows],
                        fmt="-o", color=color, ms=5, capsize=2, lw=1.4, label=FRONTIER_LABELS[method])
            for r, x, y in zip(rows, kls, rewards, strict=True):
                ax.annotate(r["setting"].split(" (")[0].replace("lr ", "lr="), (x, y), fontsize=6, color=color,
                            xytext=(3, 3), textcoords="offset points")
        untrained = measured[source]["untrained"]
        if "student" in untrained:
            ax.plot([0], [untrained["student"]["reward"]], marker="*", ms=14, color="black", ls="none",
                    label=UNTRAINED_LABELS["student"])
        if "teacher" in untrained:
            ax.axhline(untrained["teacher"]["reward"], color="gray", ls="--", lw=1,
                       label=UNTRAINED_LABELS["teacher"] + " (reward only)")
        ax.set_title(HELDOUT_SOURCES[source].label, fontsize=10)
        ax.set_xlabel("KL from the initial student (nats per continuation, on its own samples)")
        ax.set_ylabel("mean VADER reward of sampled held-out continuations")
        ax.grid(alpha=0.3)
    # One legend for both panels, below them, so that no curve is hidden under it.
    handles: dict[str, Any] = {}
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=5, fontsize=8, frameon=False)
    fig.suptitle(f"Reward against KL ({scale.name} scale; bars: std over seeds)", fontsize=11)
    fig.tight_layout(rect=(0, 0.09, 1, 1))
    fig.savefig(out_file, dpi=120)
    plt.close(fig)


def analyse(scale: FrontierScale, measured: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for source in scale.sources:
        summaries = summarize_points(scale, measured[source])
        out[source] = {"points": summaries, "comparisons": compare_all(scale, measured[source]),
                       "noise_floor": noise_floor(summaries),
                       "seeds": complete_seeds(scale, measured[source], tuple(scale.methods))}
    return out


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def write_report(scale: FrontierScale, store, out: Path, *, device_type: str, command: str, wall_seconds: float,
                 ids: dict[str, str] | None = None) -> dict[str, Any]:
    """frontier.md, frontier.json and the plot in ``out``, from the store; returns the analysis and markdown."""
    measured = collect(scale, store, device_type=device_type, ids=ids)
    analysis = analyse(scale, measured)
    text = markdown(scale, measured, analysis, command=command, wall_seconds=wall_seconds,
                    numerics=scale.base.numerics(device_type), store_runs=store.runs())
    out.mkdir(parents=True, exist_ok=True)
    (out / "frontier.md").write_text(text + "\n", encoding="utf-8")
    plot(scale, measured, analysis, out / FRONTIER_PLOT)
    document = {"scale": scale.name, "analysis": analysis, "command": command, "wall_seconds": wall_seconds}
    (out / "frontier.json").write_text(json.dumps(_json_safe(document), indent=1, allow_nan=False), encoding="utf-8")
    return {**document, "measured": measured, "markdown": text}


def _trust_caveats(source_analysis: dict[str, Any]) -> list[str]:
    """What limits the verdicts of one source beyond the noise floor: a single seed (the interval then has no
    seed-to-seed spread in it) and curves of two points (matched KL is then read off one straight chord each)."""
    lines: list[str] = []
    if len(source_analysis["seeds"]) < 2:
        lines += ["", "One seed: the interval resamples prompts only, so the spread between training seeds is not in "
                  "it. Each further run of the sweep adds the next seed."]
    # The verdicts compare the seeds every method has measured: the chords are drawn over those seeds only.
    seeds = set(source_analysis["seeds"])

    def verdict_kl(point: dict[str, Any]) -> float | None:
        kls = [kl for seed, kl in zip(point["seeds"], point["kl"]["values"], strict=True) if seed in seeds]
        return sum(kls) / len(kls) if kls else None

    curves = {m: sorted(kl for p in pts if (kl := verdict_kl(p)) is not None)
              for m, pts in source_analysis["points"].items()}
    curves = {m: kls for m, kls in curves.items() if kls}
    if curves and OURS in curves and max(len(kls) for kls in curves.values()) <= 2:
        ends = sorted((kls[-1], FRONTIER_LABELS[m]) for m, kls in curves.items())
        lines += ["", "No curve has more than 2 points, so reward at matched KL is read off one straight chord per "
                  f"method. The chords end far apart: {ends[0][1]} at KL {ends[0][0]:.2f}, {ends[-1][1]} at "
                  f"{ends[-1][0]:.2f}, {FRONTIER_LABELS[OURS]} at {curves[OURS][-1]:.2f}. A curve that rises and then flattens lies above its chord, and "
                  "more so for a longer chord, so a comparison between chords of different lengths says as much "
                  "about where the grid put the far point as about the method."]
    return lines


def splice_section(document: str, section: str) -> str:
    """``document`` with its frontier section (between BEGIN and END) replaced by ``section``, or with
    ``section`` appended when it has none. Everything else stays as it is."""
    start = document.find(BEGIN.split(" (")[0])
    if start < 0:
        return document.rstrip("\n") + "\n\n" + section.strip("\n") + "\n"
    end = document.find(END, start)
    if end < 0:
        raise ValueError(f"the document opens a frontier section but never closes it with {END}; add it and rerun")
    return document[:start] + section.strip("\n") + document[end + len(END):]


def frontier_section(document: str) -> str | None:
    """The frontier section of ``document``, markers included, or None."""
    start = document.find(BEGIN.split(" (")[0])
    end = document.find(END, start) if start >= 0 else -1
    return document[start : end + len(END)] if start >= 0 and end >= 0 else None


def publish(out: Path, docs: Path) -> None:
    """The report's section into ``docs/results.md`` (the rest of it kept) and its plot beside it."""
    docs.mkdir(parents=True, exist_ok=True)
    results = docs / "results.md"
    existing = results.read_text(encoding="utf-8") if results.exists() else ""
    results.write_text(splice_section(existing, (out / "frontier.md").read_text(encoding="utf-8")), encoding="utf-8")
    (docs / FRONTIER_PLOT).write_bytes((out / FRONTIER_PLOT).read_bytes())
    print(f"published the Frontier section of {results} and {docs / FRONTIER_PLOT}")
