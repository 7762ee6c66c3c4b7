"""Build a real preference dataset for positive-sentiment continuation (the DPO paper's controlled-sentiment task).

Prompts are the first 6-12 words of sentences of *Botchan* (Natsume Soseki, tr. Yasotaro Morri; Project Gutenberg
EBook #8868, public domain), taken ONLY from the first 70 % of the book's sentences, so that the last 30 % stay
available as held-out evaluation prompts. The packaged Gemma-3-270M base model samples two continuations per prompt;
VADER's compound score of each continuation (alone) picks the more positive one as ``chosen``. Pairs whose score gap
is below ``--min-gap`` are dropped.

Exact command (from the repository root), as used for examples/data/:

    .venv/bin/python examples/build_sentiment_pairs.py --pairs 600 --seed 0 --max-new-tokens 32 \
        --batch-size 16 --min-gap 0.25 --out-dir examples/data

``--max-new-tokens`` defaults to 32, not 40: a 20-pair trial at 40 tokens ran ~45 s per batch of 16 prompts on
2 shared CPU cores (about half of each step is top-p's sort over Gemma's 262,144-token vocabulary), which projected
~43 min for 600 pairs.

Each continuation ends at the first control token (eos, pad, or one of Gemma's ``<start_of_image>``, ``<end_of_turn>``,
``<unusedN>``...; the GGUF-converted tokenizer does not flag ``<start_of_image>`` as special, and the base model emits
it as a paragraph break) or the first newline, whichever comes first.

Outputs (TRL's explicit-prompt preference format; ``prompt + chosen`` is the full text):

- ``sentiment-pairs.jsonl`` (train) and ``sentiment-pairs-validation.jsonl`` (validation, ~10 %, a seeded split by
  prompt), one JSON object per line with keys ``prompt, chosen, rejected, chosen_score, rejected_score, source``;
  ``source`` is ``botchan:sentence=I`` where I indexes ``bench.textdata.read_sentences(botchan.txt)``.
- ``sentiment-pairs.meta.json``: settings, seed, model, the held-out sentence boundary, counts and wall time.

``--resume-cache FILE`` (optional) appends each generated batch to FILE and reuses it on a restart; since every batch
is seeded on its own, an interrupted-and-resumed build writes the same files as an uninterrupted one.

Held-out evaluation prompts: ``read_sentences(path)[meta["sentence_boundary"]["heldout_start_index"]:]``.

Deterministic for a given seed, thread count and torch/transformers build: the prompt pool and split come from
``random.Random(seed)``, and batch ``b`` is sampled under ``torch.manual_seed(seed + b)``. (CPU float rounding can
differ across torch builds or thread counts, which could change sampled tokens.)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.quality.sampling import (  # noqa: E402
    clean_continuation,
    continuation_text,
    control_token_ids,
    cut_at_control,
)
from bench.textdata import continuation_prompts, read_sentences, story_start  # noqa: E402

DEFAULT_BOOK = REPO / ".cache" / "assets" / "botchan.txt"
DEFAULT_CATALOG = REPO / ".ctpd" / "catalog"


def sha256_of(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=600, help="stop after this many kept pairs (default 600)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, default=REPO / "examples" / "data")
    parser.add_argument("--book", type=Path, default=DEFAULT_BOOK, help="Botchan text (scripts/setup extracts it)")
    parser.add_argument("--model", default="gemma-3-270m", help="catalog name or local HF folder")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CATALOG)
    parser.add_argument("--train-fraction", type=float, default=0.7,
                        help="use only sentences in the first FRACTION of the book (default 0.7)")
    parser.add_argument("--min-prompt-words", type=int, default=6)
    parser.add_argument("--max-prompt-words", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per generate() call")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--min-words", type=int, default=3, help="drop a pair if a continuation has fewer words")
    parser.add_argument("--min-gap", type=float, default=0.25, help="drop pairs whose VADER compound gap is smaller")
    parser.add_argument("--validation-fraction", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (recorded; affects rounding)")
    parser.add_argument("--prefix", default="sentiment-pairs", help="output file name prefix")
    parser.add_argument("--control-tokens", choices=["cut", "keep"], default="cut",
                        help="cut a continuation at Gemma's first control token (default), or keep the text after "
                             "it, as the first build of examples/data did ('keep' reproduces those files)")
    parser.add_argument("--resume-cache", type=Path, default=None,
                        help="JSONL of generated batches: appended to, and reused when the build is restarted")
    args = parser.parse_args(argv)

    wall_start = time.time()
    import torch
    import transformers
    import vaderSentiment
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    from ctpd_core.models import load_causal_lm

    torch.set_num_threads(args.threads)
    rng = random.Random(args.seed)

    # ---- prompts: the first 6-12 words of eligible sentences from the first 70 % of the book --------------------
    sentences = read_sentences(args.book)
    boundary = int(len(sentences) * args.train_fraction)  # sentences[boundary:] are held out
    first_story = story_start(sentences)
    min_sentence_words = args.min_prompt_words + 1  # a prompt must be a strict prefix of its sentence
    pool, skipped = continuation_prompts(sentences, 0, boundary, rng, min_prompt_words=args.min_prompt_words,
                                         max_prompt_words=args.max_prompt_words)
    prompts: list[tuple[int, str]] = [(p.sentence_index, p.prompt) for p in pool]
    print(f"{len(sentences)} sentences; boundary {boundary} ({args.train_fraction:.0%}); story starts at "
          f"{first_story}; {len(prompts)} eligible prompts; skipped {skipped}", flush=True)

    # ---- teacher -------------------------------------------------------------------------------------------------
    load_start = time.time()
    model, tokenizer = load_causal_lm(args.model, cache_dir=args.cache_dir)
    model.eval()
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    load_s = time.time() - load_start
    print(f"loaded {args.model} ({type(model).__name__}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M "
          f"params) in {load_s:.1f} s", flush=True)
    analyzer = SentimentIntensityAnalyzer()
    control = control_token_ids(tokenizer)
    end_ids = {tokenizer.eos_token_id, tokenizer.pad_token_id}

    counts = {"prompts_tried": 0, "pairs_kept": 0, "dropped_short_continuation": 0, "dropped_identical": 0,
              "dropped_small_gap": 0, "continuations_cut_at_control_token": 0, "continuations_cut_at_newline": 0,
              "decode_fallbacks": 0,
              "batches": 0, "batches_from_cache": 0, "prompts_generated_but_unused": 0}
    rows: list[dict] = []
    # Optional resume cache: one JSON line per generated batch (the decoded continuations). Each batch is seeded on
    # its own, so a resumed build gives the same files as an uninterrupted one.
    cache_key = {"model": args.model, "control_tokens": args.control_tokens, "seed": args.seed, "temperature": args.temperature, "top_p": args.top_p,
                 "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size, "threads": args.threads}
    cached: dict[int, dict] = {}
    if args.resume_cache and args.resume_cache.exists():
        for line in args.resume_cache.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            if record["key"] == cache_key:
                cached[record["batch"]] = record
        print(f"resume cache {args.resume_cache}: {len(cached)} batches", flush=True)

    def generate_batch(batch_index: int, batch: list[tuple[int, str]]) -> dict:
        texts = [prompt for _, prompt in batch]
        record = cached.get(batch_index)
        if record is not None and record["prompts"] == texts:
            counts["batches_from_cache"] += 1
            return record
        started = time.time()
        encoded = tokenizer(texts, return_tensors="pt", padding=True)  # the tokenizer's own <bos>, left-padded
        torch.manual_seed(args.seed + batch_index)
        with torch.inference_mode():
            output = model.generate(
                **encoded, do_sample=True, temperature=args.temperature, top_p=args.top_p,
                max_new_tokens=args.max_new_tokens, num_return_sequences=2, pad_token_id=tokenizer.pad_token_id,
            )
        width = encoded["input_ids"].shape[1]
        raws, control_cuts, fallbacks = [], [], []
        for j, prompt in enumerate(texts):
            for row in output[2 * j : 2 * j + 2]:  # num_return_sequences copies are adjacent
                row = row.tolist()
                if args.control_tokens == "cut":
                    generated, by_control = cut_at_control(row[width:], control, end_ids)
                else:  # "keep": the first build's behaviour (skip_special_tokens only; <start_of_image> stays)
                    generated, by_control = row[width:], False
                raw, fallback = continuation_text(tokenizer, row[:width], generated, prompt)
                raws.append(raw)
                control_cuts.append(by_control)
                fallbacks.append(fallback)
        record = {"key": cache_key, "batch": batch_index, "prompts": texts, "raw": raws,
                  "control_cut": control_cuts, "decode_fallback": fallbacks, "seconds": round(time.time() - started, 1)}
        if args.resume_cache:
            with open(args.resume_cache, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        return record

    gen_start = time.time()
    batch_seconds = []
    for batch_index, start in enumerate(range(0, len(prompts), args.batch_size)):
        if len(rows) >= args.pairs:
            break
        batch = prompts[start : start + args.batch_size]
        record = generate_batch(batch_index, batch)
        batch_seconds.append(record["seconds"])
        counts["batches"] += 1
        for j, (sentence_index, prompt) in enumerate(batch):
            if len(rows) >= args.pairs:
                counts["prompts_generated_but_unused"] += 1
                continue
            counts["prompts_tried"] += 1
            continuations = []
            for k in (2 * j, 2 * j + 1):
                counts["continuations_cut_at_control_token"] += record["control_cut"][k]
                counts["decode_fallbacks"] += record["decode_fallback"][k]
                text, cut = clean_continuation(record["raw"][k])
                counts["continuations_cut_at_newline"] += cut
                continuations.append(text)
            a, b = continuations
            if min(len(a.split()), len(b.split())) < args.min_words:
                counts["dropped_short_continuation"] += 1
                continue
            if a == b:
                counts["dropped_identical"] += 1
                continue
            score_a = analyzer.polarity_scores(a)["compound"]
            score_b = analyzer.polarity_scores(b)["compound"]
            if abs(score_a - score_b) < args.min_gap:
                counts["dropped_small_gap"] += 1
                continue
            (chosen, chosen_score), (rejected, rejected_score) = sorted(
                [(a, score_a), (b, score_b)], key=lambda item: item[1], reverse=True)
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "chosen_score": chosen_score,
                         "rejected_score": rejected_score, "source": f"botchan:sentence={sentence_index}"})
        elapsed = time.time() - gen_start
        print(f"batch {batch_index}: {len(rows)}/{args.pairs} pairs from {counts['prompts_tried']} prompts, "
              f"{elapsed:.0f} s elapsed (this batch {record['seconds']:.1f} s"
              f"{', cached' if batch_index in cached else ''})", flush=True)
    counts["pairs_kept"] = len(rows)
    generation_s = time.time() - gen_start
    if len(rows) < args.pairs:
        print(f"WARNING: prompt pool exhausted with {len(rows)} of {args.pairs} pairs", flush=True)

    # ---- seeded split by prompt ------------------------------------------------------------------------------------
    unique_prompts = sorted({row["prompt"] for row in rows})
    random.Random(f"split-{args.seed}").shuffle(unique_prompts)
    n_validation = round(len(unique_prompts) * args.validation_fraction)
    validation_prompts = set(unique_prompts[:n_validation])
    train = [row for row in rows if row["prompt"] not in validation_prompts]
    validation = [row for row in rows if row["prompt"] in validation_prompts]

    args.out_dir.mkdir(parents=True, exist_ok=True)
    files = {"train": args.out_dir / f"{args.prefix}.jsonl",
             "validation": args.out_dir / f"{args.prefix}-validation.jsonl"}
    for split, split_rows in (("train", train), ("validation", validation)):
        with open(files[split], "w", encoding="utf-8") as handle:
            for row in split_rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")

    gaps = [row["chosen_score"] - row["rejected_score"] for row in rows]
    meta = {
        "task": "positive-sentiment continuation (DPO paper's controlled-sentiment setting), VADER-labelled",
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + (argv if argv is not None else sys.argv[1:])),
        "seed": args.seed,
        "source_text": {"path": str(args.book), "sha256": sha256_of(args.book),
                        "title": "Botchan (Master Darling), Natsume Soseki, tr. Yasotaro Morri",
                        "origin": "Project Gutenberg EBook #8868 via sentencepiece 0.2.3 sdist test/botchan.txt",
                        "sentences_via": "bench.textdata.read_sentences(path) (default limits)"},
        "sentence_boundary": {
            "total_sentences": len(sentences), "train_fraction": args.train_fraction,
            "prompt_pool_end_exclusive": boundary, "heldout_start_index": boundary,
            "heldout_sentences": len(sentences) - boundary,
            "first_heldout_sentence": sentences[boundary] if boundary < len(sentences) else None,
            "last_pool_sentence": sentences[boundary - 1] if boundary else None,
            "story_start_index": first_story,
        },
        "prompt_selection": {"words": [args.min_prompt_words, args.max_prompt_words],
                             "min_sentence_words": min_sentence_words, "eligible_prompts": len(prompts),
                             "skipped_sentences": skipped, "order": "random.Random(seed).shuffle of eligible"},
        "model": {"name": args.model, "class": type(model).__name__, "dtype": str(model.dtype),
                  "tokenizer": type(tokenizer).__name__, "bos": tokenizer.bos_token, "pad": tokenizer.pad_token,
                  "padding_side": "left", "licence": "Gemma Terms of Use"},
        "generation": {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p, "top_k": None,
                       "max_new_tokens": args.max_new_tokens, "num_return_sequences": 2,
                       "batch_size": args.batch_size, "seeding": "torch.manual_seed(seed + batch_index)",
                       "postprocess": ("cut at the first control token (eos, pad, <start_of_image>, <end_of_turn>, "
                                       "<unusedN>, ...), then" if args.control_tokens == "cut" else
                                       "decode with skip_special_tokens (<start_of_image> etc. kept as text), then")
                                      + " cut at the first newline; rstrip; leading space kept",
                       "control_tokens": args.control_tokens, "control_token_ids": len(control)},
        "labelling": {"scorer": "vaderSentiment SentimentIntensityAnalyzer compound, continuation alone",
                      "min_gap": args.min_gap, "min_words": args.min_words, "chosen": "higher compound"},
        "split": {"validation_fraction": args.validation_fraction, "by": "prompt",
                  "rng": f"random.Random('split-{args.seed}')", "train": len(train), "validation": len(validation)},
        "counts": counts,
        "score_summary": {"mean_chosen": statistics.fmean(r["chosen_score"] for r in rows) if rows else None,
                          "mean_rejected": statistics.fmean(r["rejected_score"] for r in rows) if rows else None,
                          "mean_gap": statistics.fmean(gaps) if gaps else None},
        "files": {split: {"path": path.name, "rows": len(train if split == "train" else validation),
                          "sha256": sha256_of(path)} for split, path in files.items()},
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__,
                     "transformers": transformers.__version__,
                     "vaderSentiment": getattr(vaderSentiment, "__version__", "3.3.2 (per shared/assets.md)")},
        "threads": args.threads,
        "timing_s": {"model_load": round(load_s, 1), "generation": round(generation_s, 1),
                     "generation_all_batches": round(sum(batch_seconds), 1),
                     "wall": round(time.time() - wall_start, 1)},
    }
    meta_path = args.out_dir / f"{args.prefix}.meta.json"
    meta_path.write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {len(train)} train + {len(validation)} validation pairs to {args.out_dir} "
          f"({meta['timing_s']['wall']} s wall)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
