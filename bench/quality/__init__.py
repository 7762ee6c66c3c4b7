"""The quality benchmark: does the paper's ordering (CTPD > TIS-DPO > DPO > the student as is) hold, small?

Gemma-3-270M (teacher) and SmolLM2-135M-Instruct (student) have different tokenizers. Every method is trained
on the examples sentiment pairs as a job through ``worker.recipe.run_spec`` (the worker's machinery, with one
shared stage cache), then sampled on held-out Botchan prompts and scored by the VADER compound sentiment of its
continuations, reported beside its KL from the initial model (the DPO paper's reward-KL frontier).

Run: ``python -m bench.quality [--quick] [--publish]``; ``docs/results.md`` holds the table and how it was made.
The frontier (issue 14): ``python -m bench.quality.frontier [--quick | --scale cpu|gpu] [--publish]`` trains every
method at several β or learning rates and compares the reward-against-KL curves at matched KL, on Botchan and
on the Jargon File; its measurements are committed under ``bench/quality/measurements/``.
Modules: ``config`` (scales, the frontier's fixed grid), ``heldout`` (prompts, held-out sources and evaluation
sets), ``measure`` (one model's metrics), ``stats`` (win rates, seed aggregates, paired comparisons), ``report``
(markdown and plot), ``run`` (the driver); ``frontier`` (the sweep driver and its store), ``frontier_stats``
(curves, matched KL, the bootstrap), ``frontier_report`` (its section of results.md and its plot).
"""
