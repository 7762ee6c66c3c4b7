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
    from bench.textdata import gutenberg_body, sentences

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
    from bench.textdata import gutenberg_body, paragraphs

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


def _save_tiny_model(model, tokenizer, folder: Path) -> Path:
    model.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def tiny_student_folder(tmp_path_factory, student_tokenizer) -> Path:
    """A 2-layer Llama on the tiny byte-level BPE, saved as a Hugging Face folder (safetensors)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    config = LlamaConfig(
        vocab_size=len(student_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        eos_token_id=student_tokenizer.eos_token_id, attention_dropout=0.0,
    )
    return _save_tiny_model(LlamaForCausalLM(config), student_tokenizer, tmp_path_factory.mktemp("tiny-student"))


@pytest.fixture(scope="session")
def tiny_teacher_folder(tmp_path_factory, teacher_tokenizer) -> Path:
    """A 2-layer Gemma-3 on the tiny Unigram tokenizer, saved as a Hugging Face folder (safetensors)."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(2)
    config = Gemma3TextConfig(
        vocab_size=len(teacher_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=512, sliding_window=16,
        eos_token_id=teacher_tokenizer.eos_token_id, bos_token_id=teacher_tokenizer.bos_token_id,
        pad_token_id=teacher_tokenizer.pad_token_id,
    )
    return _save_tiny_model(Gemma3ForCausalLM(config), teacher_tokenizer, tmp_path_factory.mktemp("tiny-teacher"))


def make_pairs(sentences: list[str], count: int) -> list[dict]:
    """Preference rows from real sentences: the prompt is a sentence's opening, chosen its real ending,
    rejected the ending of a different sentence (a coherent-vs-incoherent preference a model can learn)."""
    rows = []
    usable = [s for s in sentences if len(s.split()) >= 8]
    for index in range(count):
        words = usable[index].split()
        other = usable[(index * 7 + 3) % len(usable)].split()
        cut = min(6, len(words) // 2)
        rows.append(
            {
                "prompt": " ".join(words[:cut]),
                "chosen": " " + " ".join(words[cut : cut + 10]),
                "rejected": " " + " ".join(other[-min(10, len(other) - 1) :]),
            }
        )
    return rows


@pytest.fixture(scope="session")
def tiny_dataset_path(tmp_path_factory, botchan_sentences) -> Path:
    import json

    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in make_pairs(botchan_sentences, 40)))
    return path
