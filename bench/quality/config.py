"""The benchmark's scales: what is trained and evaluated, and how big. Torch-free.

How the CPU scale was sized (2 cores; measured on this machine, see docs/results.md): SmolLM2-135M costs about
0.6 s per training pair (chosen + rejected, ~50 tokens each) and Gemma-3-270M about 1.1 s, so one seed of the
CPU preset (two Gemma contrastive models, two student contrastive models, four student distillations of
``train_pairs`` pairs each, plus reference and weight passes) is ~``train_pairs`` × 9 s; sampling 4 × 32
tokens on 48 prompts costs ~25 s per student and ~80 s per Gemma model.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace

TEACHER = "gemma-3-270m"
STUDENT = "smollm2-135m-instruct"

# (key, label, JobSpec fields). Each is trained from the same student with the same hyperparameters; only the
# reference model and the weights differ (method §5).
METHODS: tuple[tuple[str, str, dict], ...] = (
    ("dpo", "DPO (student reference)", {"method": "dpo"}),
    ("tisdpo", "TIS-DPO (student π±)", {"method": "tisdpo", "weights": {"source": "student_contrastive"}}),
    ("ctpd_uniform", "CTPD, uniform weights", {"method": "ctpd", "weights": {"source": "uniform"}}),
    ("ctpd", "CTPD (teacher π±, the paper)", {"method": "ctpd", "weights": {"source": "teacher_contrastive"}}),
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

    def fingerprint(self) -> str:
        """Identifies the settings a stored measurement was made with (the seeds list excepted: adding a seed
        keeps the others)."""
        values = asdict(self)
        values.pop("seeds")
        values.pop("name")
        return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


SCALES: dict[str, Scale] = {
    # The documented run: about 80 minutes on 2 idle CPU cores.
    "cpu": Scale(name="cpu", train_pairs=192, eval_prompts=48),
    # A smoke run of the whole benchmark (every method, one seed, tiny data): under 15 minutes on 2 CPU cores.
    "quick": Scale(name="quick", train_pairs=32, eval_prompts=12, seeds=(0,)),
    # One GPU, bf16: every training pair, two epochs, more prompts, samples and tokens.
    "gpu": Scale(
        name="gpu", train_pairs=540, eval_prompts=256, samples_per_prompt=8, max_new_tokens=48, epochs=2.0,
        learning_rate=2e-5, contrastive_learning_rate=2e-5, micro_batch_size=16, inference_batch_size=64,
        sampling_batch_size=64, precision="bf16",
    ),
}


def scale_with(scale: Scale, **changes) -> Scale:
    return replace(scale, **changes)
