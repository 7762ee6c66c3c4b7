"""The benchmark's scales: what is trained and evaluated, and how big. Torch-free.

How the CPU scale was sized, from the quick run's stage times on this 2-core machine
(``python -m bench.quality --quick``, 32 pairs): a training step of 16 pairs costs ~12 s for SmolLM2-135M and
~27 s for Gemma-3-270M (the π± stage, model load and save included); a reference or weights pass ~0.16 s
(SmolLM2) and ~0.35 s (Gemma) per pair and model. One seed trains 2 Gemma π± + 2 SmolLM2 π± + 4 SmolLM2
distillations, so 128 pairs (8 steps each) cost ~20 min of training and passes, and measuring the trained
models on 64 prompts x 4 samples plus 60 held-out pairs ~10 min: ~30 min per seed. Measured for docs/results.md:
106 min summed over every job and measurement (3 seeds, 5 methods, the ceiling; part of it on a machine shared
with test runs).
The noise floor at that size: the standard error of one mean reward over 64 prompts is ~0.02-0.025.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import asdict, dataclass, field

MEASURE_VERSION = 1  # bump when bench/quality/measure.py changes what a stored number means
TEACHER = "gemma-3-270m"
STUDENT = "smollm2-135m-instruct"

# (key, label, JobSpec fields). Each is trained from the same student with the same hyperparameters; only the
# reference model and the weights differ (method §5).
METHODS: tuple[tuple[str, str, dict], ...] = (
    ("dpo", "DPO (student reference)", {"method": "dpo"}),
    ("tisdpo", "TIS-DPO (student π±)", {"method": "tisdpo", "weights": {"source": "student_contrastive"}}),
    ("ctpd_uniform", "CTPD, uniform weights", {"method": "ctpd", "weights": {"source": "uniform"}}),
    ("ctpd", "CTPD (teacher π±, the paper)", {"method": "ctpd", "weights": {"source": "teacher_contrastive"}}),
    # The paper's "Average weight" ablation: the teacher's weights averaged per response. Contrastive weights
    # average above 1 (~2 on chosen responses), which enlarges the loss; this control has the same size per
    # response, so CTPD against it isolates *which* spans the weights pick.
    ("ctpd_average", "CTPD, teacher weights averaged per response",
     {"method": "ctpd", "weights": {"source": "teacher_contrastive", "average": True}}),
)
# Rows that are evaluated but not trained by a distillation job.
STUDENT_ROW = ("student", "Student as is (SmolLM2-135M-Instruct)")
TEACHER_ROW = ("teacher", "Teacher as is (Gemma-3-270M)")
TEACHER_POSITIVE_ROW = ("teacher_pi_plus", "Teacher π+ (ceiling)")


@dataclass(frozen=True)
class Scale:
    name: str
    train_pairs: int  # per seed: a seeded sample of the examples training pairs
    eval_prompts: int  # held-out Botchan prompts
    seeds: tuple[int, ...] = (0, 1, 2)
    samples_per_prompt: int = 4
    max_new_tokens: int = 32  # the examples' continuations were sampled with 32 Gemma tokens
    validation_pairs: int = 60  # the examples' validation file (held-out pairs, never trained on)
    job_validation_pairs: int = 16  # what each job's own evaluate stage reads (the benchmark measures all 60)
    epochs: float = 1.0
    learning_rate: float = 5e-5  # every distillation (dpo, tisdpo, ctpd, ctpd_uniform)
    contrastive_learning_rate: float = 5e-5  # π+ and π− (teacher for ctpd, student for tisdpo)
    beta: float = 0.1  # the paper's β
    batch_size: int = 16
    micro_batch_size: int = 8
    max_prompt_tokens: int = 32
    max_response_tokens: int = 48
    inference_batch_size: int = 16
    sampling_batch_size: int = 16  # prompts per generate() call
    sampling_seed: int = 1234  # the same for every model and training seed: common random numbers
    precision: str = "auto"  # bf16 autocast on a GPU, fp32 on the CPU
    teacher: str = TEACHER
    student: str = STUDENT
    methods: tuple[str, ...] = field(default_factory=lambda: tuple(key for key, _, _ in METHODS))

    def resolved_precision(self, device_type: str) -> str:
        if self.precision == "auto":
            return "bf16" if device_type == "cuda" else "fp32"
        return self.precision

    def numerics(self, device_type: str) -> str:
        return f"{device_type}, {self.resolved_precision(device_type)}"

    def fingerprint(self, device_type: str) -> str:
        """Identifies what a stored measurement was made with: these settings (the seeds and methods lists
        excepted, so that ``--seeds 0 1 2 3`` or a new method keeps what is measured), the device type and
        precision, and the measurement code's version."""
        values = asdict(self)
        for key in ("seeds", "methods", "name"):
            values.pop(key)
        values["numerics"] = self.numerics(device_type)
        values["measure_version"] = MEASURE_VERSION
        return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


SCALES: dict[str, Scale] = {
    # The documented run: about 1 h 45 min on 2 CPU cores (~33 min per seed, plus the untrained models).
    "cpu": Scale(name="cpu", train_pairs=128, eval_prompts=64),
    # A smoke run of the whole benchmark (every method, one seed, tiny data): under 15 minutes on 2 CPU cores.
    "quick": Scale(name="quick", train_pairs=32, eval_prompts=12, seeds=(0,)),
    # One GPU, bf16: 480 of the 540 training pairs (30 steps per model; a sample, so that seeds vary the data as on
    # the CPU), more prompts, samples and tokens.
    "gpu": Scale(
        name="gpu", train_pairs=480, eval_prompts=256, samples_per_prompt=8, max_new_tokens=48,
        learning_rate=2e-5, contrastive_learning_rate=2e-5, micro_batch_size=16, inference_batch_size=64,
        sampling_batch_size=64, precision="bf16",
    ),
}



# ------------------------------------------------------------------------------------------------ the frontier
# Issue 14: does CTPD win at matched KL? Every method is trained at several strengths and each trained model is
# measured as a (KL, reward) point; the points of one method make its curve (the DPO paper's Figure 2).
#
# THE GRID, fixed before any result was seen (do not edit it after a sweep has run; add a new grid instead):
# - DPO, TIS-DPO, CTPD and CTPD-uniform sweep β over FRONTIER_BETAS: a decade on either side of the paper's 0.1,
#   in steps of ~3x, which is the knob the DPO paper's frontier sweeps.
# - SFT, ULD and DSKD have no β. They sweep the learning rate over FRONTIER_LR_FACTORS times the scale's learning
#   rate (5e-5 on the CPU): the learning rate is the one knob all three share, and with the steps fixed it moves
#   the trained model away from the initial student monotonically. κ stays at the paper's 0.5 and DSKD's
#   temperature at 2.0 (method §8); DSKD's projector keeps the spec's own learning rate (1e-3), since it starts
#   from random weights and its rate is not a distance knob.
# - ULD compares positions by our aligned spans (``uld_alignment: span``, the spec's default): both models then
#   read the same text at every compared position, where the paper's first-answer-token alignment pairs
#   positions whose prefixes differ whenever the tokenizers split the answer differently.
# - Everything else is the scale's and identical for every method and point: the training pairs (the same seeded
#   sample per seed), steps, batch, optimizer, schedule, π± settings, sequence budgets and the seeds.
FRONTIER_VERSION = 1  # bump when bench/quality/frontier*.py changes what a stored frontier number means
FRONTIER_BETAS: tuple[float, ...] = (0.03, 0.1, 0.3, 1.0)
FRONTIER_LR_FACTORS: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0)
KD_KAPPA = 0.5  # the paper's κ for ULD and DSKD
DSKD_TEMPERATURE = 2.0  # the paper's DSKD temperature

# (key, label, knob, JobSpec fields). knob "beta" sweeps FRONTIER_BETAS, "lr" sweeps FRONTIER_LR_FACTORS.
FRONTIER_METHODS: tuple[tuple[str, str, str, dict], ...] = (
    ("dpo", "DPO", "beta", {"method": "dpo"}),
    ("tisdpo", "TIS-DPO", "beta", {"method": "tisdpo", "weights": {"source": "student_contrastive"}}),
    ("ctpd_uniform", "CTPD-uniform", "beta", {"method": "ctpd", "weights": {"source": "uniform"}}),
    ("ctpd", "CTPD", "beta", {"method": "ctpd", "weights": {"source": "teacher_contrastive"}}),
    ("sft", "SFT", "lr", {"method": "sft"}),
    ("uld", "ULD (span alignment)", "lr", {"method": "uld", "kd": {"kappa": KD_KAPPA, "uld_alignment": "span"}}),
    ("dskd", "DSKD", "lr", {"method": "dskd", "kd": {"kappa": KD_KAPPA, "temperature": DSKD_TEMPERATURE}}),
)
FRONTIER_LABELS = {key: label for key, label, _, _ in FRONTIER_METHODS}
# The held-out text sources every frontier model is measured on (bench/quality/heldout.py: HELDOUT_SOURCES).
FRONTIER_SOURCES: tuple[str, ...] = ("botchan", "jargon")


@dataclass(frozen=True)
class FrontierPoint:
    """One grid point: a method at one β (knob "beta") or one learning-rate factor (knob "lr")."""

    method: str
    knob: str
    value: float

    @property
    def key(self) -> str:
        return f"{self.method}-beta{self.value:g}" if self.knob == "beta" else f"{self.method}-lr{self.value:g}x"

    def describe(self, scale: Scale) -> str:
        if self.knob == "beta":
            return f"β {self.value:g}"
        return f"lr {self.value * scale.learning_rate:.3g} (×{self.value:g})"

    def spec_fields(self, scale: Scale) -> dict:
        """The JobSpec fields of this point on top of the scale's shared ones."""
        fields = next(f for key, _, _, f in FRONTIER_METHODS if key == self.method)
        if self.knob == "beta":
            return {**fields, "beta": self.value}
        return {**fields, "training": {"learning_rate": self.value * scale.learning_rate}}


@dataclass(frozen=True)
class FrontierScale:
    """A frontier sweep: the benchmark scale every point shares (``base``), and which part of the fixed grid it
    runs. A scale may run a subset of the grid (the CPU one does), never other values."""

    name: str
    base: Scale
    betas: tuple[float, ...] = FRONTIER_BETAS
    lr_factors: tuple[float, ...] = FRONTIER_LR_FACTORS
    methods: tuple[str, ...] = tuple(key for key, _, _, _ in FRONTIER_METHODS)
    sources: tuple[str, ...] = FRONTIER_SOURCES
    # How many of ``base.seeds`` one run trains when no --seeds are given: the first ones not yet stored, so that
    # each run fits its time budget and seeds accumulate across runs and machines. None: all of them.
    seeds_per_run: int | None = None
    # What the β methods (DPO, TIS-DPO, CTPD, CTPD-uniform) sweep: "beta" (FRONTIER_BETAS, at the scale's learning
    # rate) or "lr" (FRONTIER_LR_FACTORS at the paper's β 0.1, the knob every method then shares). See BETA_BARELY_MOVES_KL.
    beta_methods_sweep: str = "beta"

    def __post_init__(self) -> None:
        if not set(self.betas) <= set(FRONTIER_BETAS) or not set(self.lr_factors) <= set(FRONTIER_LR_FACTORS):
            raise ValueError(
                f"the frontier grid is fixed (β {FRONTIER_BETAS}, learning-rate factors {FRONTIER_LR_FACTORS}); "
                f"a scale may use a subset of it, not β {self.betas} / factors {self.lr_factors}"
            )
        unknown = sorted(set(self.methods) - set(FRONTIER_LABELS))
        if unknown:
            raise ValueError(f"unknown frontier methods {unknown}; choose from {sorted(FRONTIER_LABELS)}")
        if not self.sources:
            raise ValueError("a frontier scale needs at least one held-out source")
        if self.beta_methods_sweep not in ("beta", "lr"):
            raise ValueError(f"beta_methods_sweep must be 'beta' or 'lr', got {self.beta_methods_sweep!r}")

    @property
    def seeds(self) -> tuple[int, ...]:
        return self.base.seeds

    def points(self) -> list[FrontierPoint]:
        """Every grid point of this scale, method by method (the order the sweep trains them in)."""
        out = []
        for key, _, knob, _ in FRONTIER_METHODS:
            if key in self.methods:
                knob = "lr" if knob == "beta" and self.beta_methods_sweep == "lr" else knob
                out += [FrontierPoint(key, knob, v) for v in (self.betas if knob == "beta" else self.lr_factors)]
        return out

    def fingerprint(self, device_type: str, row: str | dict, source: str) -> str:
        """Identifies one stored measurement: the shared settings (:meth:`Scale.fingerprint`, device and
        precision included), the frontier code's version, what the row trained (a point's JobSpec fields, or the
        name of an untrained model) and the held-out source (its name and the hash of its prompts)."""
        values = {"base": self.base.fingerprint(device_type), "version": FRONTIER_VERSION, "row": row,
                  "source": source}
        return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


# How the frontier scales were sized, from the stage times of a first quick run on this 2-core machine (32 pairs,
# 2 optimizer steps per model, 16 prompts x 2 samples per source; its table is kept in the commit that sized them):
# - Distill, per optimizer step of 16 pairs (the job's model load and final checkpoint included): DPO, TIS-DPO,
#   CTPD, CTPD-uniform ~13.5 s; SFT ~7 s (chosen responses only); ULD ~29 s and DSKD ~21 s (the live Gemma
#   forward, ULD's sorted 262k-vocabulary distributions, DSKD's projector). The job's own evaluate stage: ~17 s
#   for 16 pairs, so the frontier's jobs evaluate 4 (the sweep measures every model itself).
# - Once per seed (cached across β): Gemma π± ~37 s per step each, SmolLM2 π± ~16 s; the teacher reference
#   ~0.5 s per pair, the teacher π± weights ~0.55 s per pair and model, the student's references ~0.23 s per pair.
# - Measuring one trained student: ~0.5 s per sample (sampling at 64 prompts per call ~0.22 s, the exact KL pass
#   with both models ~0.27 s) plus ~0.1 s per prompt (bits per byte); 60 held-out pairs would add ~12 s per point,
#   so the frontier does not score them (its reward and KL do not use them; bench.quality's table does).
# The cpu scale per seed, at 128 pairs (8 steps, the benchmark's own training): once per seed 2 x 8 x 37 (Gemma
# π±) + 2 x 8 x 16 (SmolLM2 π±) + ~340 (references, weights) ~ 1,190 s; 14 jobs (2 grid points per method), each
# 8 steps + ~14 s (evaluate, loads, export): DPO-like 122 s, SFT 70, ULD 246, DSKD 182, so 4 x 2 x 122 + 2 x 70
# + 2 x 246 + 2 x 182 ~ 1,970 s; 14 measurements of 100 prompts x 1 sample on 2 sources ~ 14 x 2 x 100 x 0.59
# ~ 1,650 s: ~80 min in all, plus ~5 min for the untrained student and
# teacher in the first run only. Three grid points per method would leave ~27 prompts per source in the same
# 90 minutes (a noise floor near 0.06): two points at the ends of the fixed grid (β 0.03 and 1.0, learning rate
# x1/4 and x2, the widest KL spread for the cost) with four times the prompts.
# The noise floor at 100 samples per source is ~0.03 per point and seed; seeds accumulate across runs (one per
# run), and the same prompts and sampling seeds for every model make the differences less noisy than that.
# BETA_BARELY_MOVES_KL, measured before any cpu or gpu result (the quick run of commit 05d927f, committed under
# bench/quality/measurements/quick): at a fixed learning rate and step count β hardly changes how far a model moves
# from the initial student. DPO ended at KL 0.063 (β 0.03) and 0.058 (β 1.0) on Botchan, CTPD at 0.056 and 0.055;
# the learning-rate sweep of SFT, ULD and DSKD spread KL from ~0.01 (×1/4) to ~0.35 (×2). AdamW normalises the
# gradient's scale, and β only matters once the sigmoid saturates, which a few hundred pairs never reach. A β sweep
# therefore gives each DPO-like method a curve too short to meet another's at any KL: no matched-KL comparison. So
# the cpu and gpu scales sweep the learning rate for every method (the same factors, β 0.1 for the β methods),
# which traces each curve across the same KL range; the quick scale keeps the β sweep, which is what showed this.
FRONTIER_SCALES: dict[str, FrontierScale] = {
    # A smoke run of the whole sweep: every method at two grid points, one seed, tiny data (2 steps of 8 pairs per
    # model, responses cut to 32 tokens, 8 prompts x 1 sample of 16 tokens per source): ~13 min on 2 cores. With
    # 48-token responses and 24-token samples it took 16.4 min on this machine (π± ~105 s per family, each job
    # ~16-50 s, mostly model loads and the final checkpoint; ~6.5 s per measurement).
    "quick": FrontierScale(
        name="quick",
        base=Scale(name="quick", train_pairs=16, batch_size=8, micro_batch_size=8, eval_prompts=8,
                   samples_per_prompt=1, max_new_tokens=16, max_response_tokens=32, validation_pairs=0,
                   job_validation_pairs=4, sampling_batch_size=64, seeds=(0,)),
        betas=(0.03, 1.0), lr_factors=(0.25, 2.0),
    ),
    # One seed per run (~85 min on 2 cores, sized above), the next one not yet stored: three runs give 0, 1, 2.
    "cpu": FrontierScale(
        name="cpu",
        base=Scale(name="cpu", train_pairs=128, eval_prompts=100, samples_per_prompt=1, validation_pairs=0,
                   job_validation_pairs=4, sampling_batch_size=64, seeds=(0, 1, 2)),
        betas=(0.03, 1.0), lr_factors=(0.25, 2.0), seeds_per_run=1, beta_methods_sweep="lr",
    ),
    # One GPU, bf16 (bench/quality/gpu.sh frontier), one seed per run. An estimate, not yet run on a GPU: a job of
    # 30 steps ~10-15 s there (model loads, the final checkpoint and the export dominate), a measurement of 256
    # prompts ~5-8 s per source, so 21 points (three per method: the grid's ends and the paper's β 0.1 / the
    # scale's learning rate) ~8-9 min with π± and the untrained models.
    "gpu": FrontierScale(
        name="gpu",
        base=dataclasses.replace(SCALES["gpu"], eval_prompts=256, samples_per_prompt=1, max_new_tokens=32,
                                 validation_pairs=0, job_validation_pairs=16, seeds=(0, 1, 2)),
        betas=(0.03, 0.1, 1.0), lr_factors=(0.25, 1.0, 2.0), seeds_per_run=1, beta_methods_sweep="lr",
    ),
}
