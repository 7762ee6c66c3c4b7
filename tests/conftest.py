"""Shared fixtures: packaged real text, tiny tokenizers trained on it in-process, the packaged real tokenizers.

The tiny pair is deliberately of two different families, like the real pair: a GPT-2-style byte-level BPE
(offsets untrimmed, byte pieces of one character share an offset) and a SentencePiece-style Unigram with the
Metaspace pre-tokenizer (``▁`` marks spaces; characters it never saw become ``<unk>``), which also prepends
``<bos>`` like Gemma does.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("CTPD_ASSETS", REPO / ".cache" / "assets"))


def catalog_cache() -> Path:
    """The same catalog cache the CLI uses from the repo root, so the real tokenizers convert once."""
    return Path(os.environ.get("CTPD_HOME", REPO / ".ctpd")) / "catalog"


@pytest.fixture(scope="session")
def botchan_text() -> str:
    path = ASSETS / "botchan.txt"
    if not path.exists():
        pytest.fail(f"{path} is missing: run scripts/setup (it extracts botchan.txt from the sentencepiece sdist)")
    return path.read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def botchan_sentences(botchan_text: str) -> list[str]:
    from ctpd_core.textdata import gutenberg_body, sentences

    return sentences(gutenberg_body(botchan_text))


def _train_byte_level_bpe(corpus: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>")


def _train_unigram(corpus: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.Unigram())
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"], unk_token="<unk>"
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    bos = tokenizer.token_to_id("<bos>")
    tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", bos)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>", pad_token="<pad>"
    )


@pytest.fixture(scope="session")
def tiny_corpus(botchan_text: str) -> list[str]:
    from ctpd_core.textdata import gutenberg_body, paragraphs

    return paragraphs(gutenberg_body(botchan_text))


@pytest.fixture(scope="session")
def student_tokenizer(tiny_corpus: list[str]):
    """The tiny student tokenizer: byte-level BPE, vocab 1,000, trained on Botchan."""
    return _train_byte_level_bpe(tiny_corpus, vocab_size=1000)


@pytest.fixture(scope="session")
def teacher_tokenizer(tiny_corpus: list[str]):
    """The tiny teacher tokenizer: SentencePiece-style Unigram, vocab 600, trained on Botchan."""
    return _train_unigram(tiny_corpus, vocab_size=600)


@pytest.fixture(scope="session")
def real_student_tokenizer():
    """SmolLM2-135M-Instruct's byte-level BPE, from the packaged GGUF (converted once, then cached)."""
    from ctpd_core.models import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct", cache_dir=catalog_cache())


@pytest.fixture(scope="session")
def real_teacher_tokenizer():
    """Gemma-3-270M's SentencePiece BPE (vocab 262,144), from the packaged GGUF (converted once, then cached)."""
    from ctpd_core.models import load_tokenizer

    return load_tokenizer("gemma-3-270m", cache_dir=catalog_cache())
