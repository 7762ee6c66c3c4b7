"""The report: results.md (tables, verdict, settings), results.json and the reward-against-KL plot."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

from bench.quality.config import METHODS, STUDENT_ROW, TEACHER_POSITIVE_ROW, TEACHER_ROW, Scale
from bench.quality.stats import (
    bootstrap_difference,
    paired_difference,
    prompt_standard_error,
    summarize,
    win_rate,
)

PLOT_NAME = "results-reward-vs-kl.png"
COLUMNS = ("reward", "win_rate", "preference_accuracy", "kl", "bits_per_byte")
HEADERS = {
    "reward": "reward (VADER, −1..1)",
    "win_rate": "win rate vs student",
    "preference_accuracy": "held-out pref. acc.",
    "kl": "KL from initial (nats/cont.)",
    "bits_per_byte": "bits/byte held-out text",
}
# The paper's method against each of the others (and the untrained student).
COMPARISONS = ("dpo", "tisdpo", "ctpd_uniform", "ctpd_average", STUDENT_ROW[0])


def _labels() -> dict[str, str]:
    labels = {key: label for key, label, _ in METHODS}
    labels.update(dict([STUDENT_ROW, TEACHER_ROW, TEACHER_POSITIVE_ROW]))
    return labels


def command_and_compute(command: str, compute_seconds: float, wall_seconds: float, numerics: str,
                        why_summed: str) -> list[str]:
    """The report lines that say how to regenerate it and what it cost: the command, then the compute summed over
    the stored timings (``why_summed`` says why a sum and not this run's wall time)."""
    return [
        "```", command, "```", "",
        f"Compute: {compute_seconds / 60:.1f} min of jobs and measurements in all (the sum of the stored timings, "
        f"{why_summed})" + (f"; this invocation ran {wall_seconds / 60:.1f} min" if wall_seconds else "")
        + f"; {numerics}, {platform.machine()}, {time.strftime('%Y-%m-%d')}.",
    ]


def collect(scale: Scale, store) -> dict[str, Any]:
    """Every stored measurement, per row and seed, with the win rate against the initial student added."""
    student = store.get(STUDENT_ROW[0], None)
    rows: dict[str, dict[str, Any]] = {}
    fixed = [(STUDENT_ROW[0], None), (TEACHER_ROW[0], None)]
    per_seed = [(row, seed) for row in (*scale.methods, TEACHER_POSITIVE_ROW[0]) for seed in scale.seeds]
    for row, seed in fixed + per_seed:
        measurement = store.get(row, seed)
        if measurement is None:
            continue
        if student is not None:
            measurement["win_rate"] = win_rate(measurement["rewards"], student["rewards"])
        measurement["reward_se"] = prompt_standard_error(measurement["rewards"])
        rows.setdefault(row, {})["-" if seed is None else str(seed)] = measurement
    return rows


def _complete_seeds(rows: dict[str, Any], scale: Scale) -> list[str]:
    """Seeds for which every method (and the ceiling) was measured: comparisons use only these."""
    wanted = [*scale.methods] + ([TEACHER_POSITIVE_ROW[0]] if "ctpd" in scale.methods else [])
    return [str(s) for s in scale.seeds if all(str(s) in rows.get(r, {}) for r in wanted)]


def _fmt(summary: dict[str, Any], digits: int = 3) -> str:
    if summary["n"] == 0:
        return "—"
    if summary["n"] == 1:
        return f"{summary['mean']:.{digits}f}"
    return f"{summary['mean']:.{digits}f} ± {summary['std']:.{digits}f}"


def summarize_rows(rows: dict[str, Any], seeds: list[str]) -> dict[str, dict[str, Any]]:
    out = {}
    for row, by_seed in rows.items():
        chosen = [by_seed["-"]] if "-" in by_seed else [by_seed[s] for s in seeds if s in by_seed]
        out[row] = {column: summarize([m[column] for m in chosen if column in m]) for column in COLUMNS}
        out[row]["reward_se"] = summarize([m["reward_se"] for m in chosen])
    return out


def compare(rows: dict[str, Any], seeds: list[str]) -> dict[str, dict[str, Any]]:
    """CTPD (teacher π±) minus each other method, per seed, on reward and KL; a bootstrap interval of the reward
    difference over seeds and prompts; and CTPD's head-to-head win rate against it on the same prompts and
    sampling seeds."""
    ours = rows.get("ctpd", {})
    result = {}
    for other in COMPARISONS:
        theirs = rows.get(other, {})
        pairs = [(ours[s], theirs["-"] if "-" in theirs else theirs.get(s)) for s in seeds if s in ours]
        pairs = [(a, b) for a, b in pairs if b is not None]
        if not pairs:
            continue
        result[other] = {
            "reward": paired_difference([a["reward"] for a, _ in pairs], [b["reward"] for _, b in pairs]),
            "kl": paired_difference([a["kl"] for a, _ in pairs], [b["kl"] for _, b in pairs]),
            "bootstrap": bootstrap_difference([a["rewards"] for a, _ in pairs], [b["rewards"] for _, b in pairs]),
            "head_to_head": summarize([win_rate(a["rewards"], b["rewards"]) for a, b in pairs]),
        }
    return result


def verdict(comparisons: dict[str, Any], labels: dict[str, str]) -> list[str]:
    """Plain sentences on whether CTPD beat each method here, by how much, and how sure that is.

    "beat" needs every seed in CTPD's favour *and* the bootstrap interval (seeds and prompts resampled) above 0;
    the t-interval over seeds is shown too, but it carries the training noise only. Reward alone does not make
    a frontier win, so the KL difference is stated beside it.
    """
    lines = []
    for other, c in comparisons.items():
        d, boot, kl = c["reward"], c["bootstrap"], c["kl"]
        n = d["n"]
        if n == 0:
            continue
        gap = f"{d['mean']:+.3f} reward (per seed: {', '.join(f'{v:+.3f}' for v in d['values'])})"
        interval = f"bootstrap 95 % interval over seeds and prompts [{boot['low']:+.3f}, {boot['high']:+.3f}]"
        if n < 2:
            certainty = f"one seed only, so no training spread; {interval} (prompts only)"
        else:
            t_low, t_high = d["mean"] - d["ci95"], d["mean"] + d["ci95"]
            certainty = (
                f"{d['seeds_better']}/{n} seeds favour CTPD; {interval}; t-interval over seeds alone "
                f"[{t_low:+.3f}, {t_high:+.3f}]"
            )
        if n >= 2 and d["seeds_better"] == n and boot["low"] > 0:
            outcome = "beat"
        elif n >= 2 and d["seeds_better"] == 0 and boot["high"] < 0:
            outcome = "lost to"
        else:
            outcome = "did not clearly beat" if d["mean"] >= 0 else "did not clearly lose to"
        kl_text = f"KL difference {kl['mean']:+.3f} nats" + (f" (± {kl['std']:.3f} over seeds)" if n > 1 else "")
        if d["mean"] > 0 and kl["mean"] > 0:
            kl_text += ": CTPD's higher reward came with more KL, which by itself is not a frontier win"
        elif d["mean"] > 0:
            kl_text += ": the higher reward came at no more KL"
        h2h = c["head_to_head"]
        lines.append(
            f"- CTPD {outcome} **{labels[other]}**: {gap}; {certainty}. Head-to-head sample win rate "
            f"{h2h['mean']:.3f}. {kl_text}."
        )
    return lines


def markdown(
    scale: Scale, rows, summaries, comparisons, seeds, *, command: str, wall_seconds: float, numerics: str
) -> str:
    labels = _labels()
    sample_text = (
        f"all {scale.train_pairs} pairs (seeds change only the order)" if scale.train_pairs >= 540
        else f"a seeded sample of {scale.train_pairs} of the 540 pairs"
    )
    steps = -(-scale.train_pairs // scale.batch_size) * int(scale.epochs) if scale.epochs == int(scale.epochs) else None
    order = [STUDENT_ROW[0], *scale.methods, TEACHER_ROW[0], TEACHER_POSITIVE_ROW[0]]
    compute = sum(
        m.get("job_seconds", 0.0) + m.get("measure_seconds", 0.0) for by_seed in rows.values() for m in by_seed.values()
    )
    lines = [
        "# Quality benchmark: CTPD against DPO and TIS-DPO, Gemma-3-270M → SmolLM2-135M-Instruct",
        "",
        f"Scale **{scale.name}**; seeds measured: {', '.join(seeds) or 'none yet'} of "
        f"{', '.join(map(str, scale.seeds))}. Regenerate with:",
        "",
        *command_and_compute(command, compute, wall_seconds, numerics, "so resumes do not distort it"),
        "",
        f"Values are mean ± standard deviation over the {len(seeds)} training seed(s); the untrained models have one "
        "value. Every row is sampled on the same held-out prompts with the same sampling seeds.",
        "",
        "| method | " + " | ".join(HEADERS[c] for c in COLUMNS) + " |",
        "|---|" + "---|" * len(COLUMNS),
    ]
    for row in order:
        if row not in summaries:
            continue
        s = summaries[row]
        cells = [_fmt(s[c]) for c in COLUMNS]
        if row.startswith("teacher"):
            cells[COLUMNS.index("preference_accuracy")] += " ᵗ"
            cells[COLUMNS.index("kl")] += " ᵗ"
        lines.append(f"| {labels[row]} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "ᵗ against the initial *teacher* (the teacher rows are not students: their KL and preference accuracy are "
        "measured from Gemma-3-270M as is, not from the student).",
        "",
        f"![reward against KL]({PLOT_NAME})",
        "",
        "## Did CTPD beat the others here?",
        "",
        *(verdict(comparisons, labels) or ["- Not yet measurable: no seed has every method measured."]),
        "",
        "Sampling noise of one mean reward (standard error over prompts, averaged over seeds): "
        + ", ".join(f"{labels[r]} {summaries[r]['reward_se']['mean']:.3f}" for r in order if r in summaries)
        + ".",
        "",
        "## Per seed",
        "",
        "| method | seed | reward | win rate | pref. acc. | KL | bits/byte | tokens/cont. (EOS incl.) | ended | distinct-2 "
        "| job s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in order:
        for seed, m in sorted(rows.get(row, {}).items()):
            lines.append(
                f"| {labels[row]} | {seed} | {m['reward']:+.4f} | {m.get('win_rate', float('nan')):.3f} | "
                f"{m['preference_accuracy']:.3f} | {m['kl']:.3f} | {m['bits_per_byte']:.4f} | {m['mean_tokens']:.1f} | "
                f"{m['ended_share']:.2f} | {m['distinct_2']:.3f} | {m.get('job_seconds', '')} |"
            )
    lines += [
        "",
        "## How it was made",
        "",
        f"- Teacher `{scale.teacher}`, student `{scale.student}` (different tokenizers: Gemma's 262k SentencePiece "
        "vocabulary, SmolLM2's 49k byte-level BPE).",
        f"- Training data per seed: {sample_text} in "
        "`examples/data/sentiment-pairs.jsonl` (Gemma-3-270M continuations of Botchan sentence openings, chosen by "
        f"VADER); {scale.epochs:g} epoch(s) at batch {scale.batch_size}"
        + (f" ({steps} optimizer steps per model)" if steps else "")
        + f", learning rate {scale.learning_rate:g} for every distillation and {scale.contrastive_learning_rate:g} "
        f"for π±, β {scale.beta:g} (π±: the spec default 0.3), cosine schedule with 10 % warmup, AdamW, "
        f"on {numerics}. The hyperparameters were fixed before any result and are the same for "
        "every method; only the reference model and the weights differ.",
        "- Methods, each a job through `worker.recipe.run_spec` (the worker's code path): `dpo` (reference: the "
        "initial student), `tisdpo` (student π± token weights), `ctpd` with `weights.source: uniform` (reference: "
        "the teacher, no weights), `ctpd` (teacher π± span weights: the paper), `ctpd` with `weights.average` (the "
        "teacher's span weights replaced by their mean per response: the same loss size, no choice of spans). The "
        "teacher's π+ is the DPO model the `ctpd` job trained for its weights.",
        f"- Held-out prompts: {scale.eval_prompts} openings of sentences from the last 30 % of Botchan, which the "
        f"dataset never prompted from; {scale.samples_per_prompt} samples each, {scale.max_new_tokens} new tokens at "
        "most, temperature 1, no top-k/top-p, sampling seeds shared by every model. Reward: VADER compound of the "
        "continuation alone (cut at the first newline, as the dataset's were).",
        "- Win rate: P(a sample of the method beats a sample of the initial student on the same prompt), ties half.",
        f"- Held-out preference accuracy: on the {scale.validation_pairs} validation pairs (`examples/data/sentiment-pairs-validation.jsonl`), how often log p(chosen) − log p(rejected) rose "
        "above the initial model's (ties half, so an untrained model scores 0.5). Unlike the recipe's own "
        "`preference_accuracy` (against each method's training reference), this compares across methods.",
        "- KL: Σ over each sampled continuation's positions of the exact KL(model ‖ initial model) of the full "
        "next-token distributions, averaged over samples (the DPO paper's frontier reports reward against it). It "
        "counts every sampled token, also those after a newline that the reward does not read: the KL is the "
        "policy's, the reward a function of its sample.",
        "- Bits per byte: of the real rest of each held-out sentence given its opening (tokenizer-independent).",
        "- Comparisons pair seeds (the same training data and sampling seeds on both sides). The bootstrap interval "
        "resamples seeds and prompts together (4,000 draws), so it carries both the training noise and the "
        "evaluation noise (the untrained student's one measurement included); the t-interval over seeds carries the "
        "training noise only. Both are conditional on this one prompt pool and these sampling seeds. \"Beat\" "
        "means every seed favours CTPD and the bootstrap interval lies above 0.",
        "- Full per-sample data (texts and rewards): `results.json` in the run's folder.",
        "",
    ]
    return "\n".join(lines)


def plot(rows, summaries, seeds: list[str], out_file: Path) -> None:
    """Two panels, since the families' KLs are from different initial models (and π+ moves far further):
    the students against KL from the initial student, the teacher and its π+ against KL from the initial
    teacher. Small dots are seeds, markers the mean ± std; dashed lines carry the teacher rows' rewards over."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = _labels()
    fig, (students, teachers) = plt.subplots(
        1, 2, figsize=(10, 5), sharey=True, gridspec_kw={"width_ratios": [3, 1.3]}
    )
    families = (
        (students, [STUDENT_ROW[0], *[k for k, _, _ in METHODS]], "o"),
        (teachers, [TEACHER_ROW[0], TEACHER_POSITIVE_ROW[0]], "s"),
    )
    index = 0
    for ax, family_rows, marker in families:
        for row in family_rows:
            color = f"C{index}"
            index += 1
            if row not in summaries:
                continue
            points = [m for seed, m in rows[row].items() if seed == "-" or seed in seeds]
            ax.scatter([m["kl"] for m in points], [m["reward"] for m in points], s=14, color=color, alpha=0.45)
            s = summaries[row]
            ax.errorbar(
                s["kl"]["mean"], s["reward"]["mean"], xerr=s["kl"]["std"], yerr=s["reward"]["std"], fmt=marker,
                color=color, ms=8, capsize=3, label=labels[row],
            )
            if ax is teachers:
                students.axhline(s["reward"]["mean"], color=color, ls="--", lw=1, alpha=0.7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left" if ax is students else "center left")
    students.set_xlabel("KL from the initial student (nats per continuation, on its own samples)")
    teachers.set_xlabel("KL from the initial teacher (nats)")
    students.set_ylabel("mean VADER reward of sampled held-out continuations")
    students.set_title("Students (dashed: the teacher rows' rewards)", fontsize=10)
    teachers.set_title("Teacher and its π+", fontsize=10)
    fig.suptitle("Reward against KL (dots: seeds; markers: mean ± std over seeds)", fontsize=11)
    fig.tight_layout()
    fig.savefig(out_file, dpi=120)
    plt.close(fig)


def _json_safe(value: Any) -> Any:
    """NaN (an interval of one seed) as null, so results.json is strict JSON."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def write_report(
    scale: Scale, store, out: Path, *, command: str, wall_seconds: float, numerics: str = "cpu, fp32"
) -> dict[str, Any]:
    rows = collect(scale, store)
    seeds = _complete_seeds(rows, scale)
    summaries = summarize_rows(rows, seeds)
    comparisons = compare(rows, seeds)
    text = markdown(
        scale, rows, summaries, comparisons, seeds, command=command, wall_seconds=wall_seconds, numerics=numerics
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(text, encoding="utf-8")
    plot(rows, summaries, seeds, out / PLOT_NAME)
    document = {"scale": scale.__dict__, "numerics": numerics, "seeds": seeds, "summaries": summaries,
                "comparisons": comparisons, "rows": rows, "command": command, "wall_seconds": wall_seconds}
    (out / "results.json").write_text(
        json.dumps(_json_safe(document), indent=1, default=list, allow_nan=False), encoding="utf-8"
    )
    return {**document, "markdown": text}
