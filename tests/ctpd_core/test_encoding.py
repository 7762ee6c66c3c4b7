"""Truncation on text, the EOS span, prompt formats: both sides must always cover the identical strings."""

from __future__ import annotations

import numpy as np
import pytest

from ctpd_core.encoding import EncodingConfig, PairEncoder, truncate_text

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _response_bytes(side, tokenizer, eos_span: bool) -> str:
    ids = side.input_ids[side.prompt_length :]
    if eos_span:
        assert ids[-1] == tokenizer.eos_token_id
        ids = ids[:-1]
    return tokenizer.decode(ids.tolist())


def test_truncation_is_on_text_and_both_sides_cover_it(student_tokenizer, teacher_tokenizer, botchan_sentences):
    encoder = PairEncoder(student_tokenizer, teacher_tokenizer, EncodingConfig(max_response_tokens=12))
    long_response = " ".join(botchan_sentences[10:14])
    (encoded,) = encoder.encode_responses("A prompt:", [long_response])
    assert encoded.truncated
    assert long_response.startswith(encoded.response) and len(encoded.response) < len(long_response)
    # Counted in student tokens: the student side has at most 12 response tokens and no EOS (it did not end).
    assert encoded.student.response_length <= 12
    assert encoded.num_spans == encoded.alignment.num_spans
    # Both sides cover exactly the same text: the alignment tiles it with no tail left over.
    assert encoded.alignment.covered_bytes == len(encoded.response.encode())
    assert encoded.student.input_ids[-1] != student_tokenizer.eos_token_id


def test_truncation_counted_in_teacher_tokens(student_tokenizer, teacher_tokenizer, botchan_sentences):
    config = EncodingConfig(max_response_tokens=10, length_unit="teacher")
    encoder = PairEncoder(student_tokenizer, teacher_tokenizer, config)
    (encoded,) = encoder.encode_responses("Q:", [" ".join(botchan_sentences[20:23])])
    assert encoded.truncated and encoded.teacher.response_length <= 10


def test_truncation_never_splits_a_character(student_tokenizer):
    text = "ab😀😀😀😀 日本語 and more words here"
    for limit in range(1, 12):
        cut = truncate_text(text, student_tokenizer, limit)
        assert text.startswith(cut)
        assert len(student_tokenizer(cut, add_special_tokens=False)["input_ids"]) <= limit
        cut.encode("utf-8")  # valid text


def test_prompt_truncation_keeps_the_end(student_tokenizer, teacher_tokenizer, botchan_sentences):
    encoder = PairEncoder(student_tokenizer, teacher_tokenizer, EncodingConfig(max_prompt_tokens=8))
    prompt = " ".join(botchan_sentences[30:33])
    kept = encoder.truncate_prompt(prompt)
    assert prompt.endswith(kept) and len(kept) < len(prompt)
    assert len(student_tokenizer(kept, add_special_tokens=False)["input_ids"]) <= 8


def test_eos_span_is_its_own_final_span(student_tokenizer, teacher_tokenizer):
    encoder = PairEncoder(student_tokenizer, teacher_tokenizer, EncodingConfig(eos_span=True))
    (encoded,) = encoder.encode_responses("Question: why?", [" Because it is good."])
    assert not encoded.truncated
    assert encoded.num_spans == encoded.alignment.num_spans + 1
    for side, tokenizer in ((encoded.student, student_tokenizer), (encoded.teacher, teacher_tokenizer)):
        assert side.input_ids[-1] == tokenizer.eos_token_id
        assert side.token_span[-1] == encoded.num_spans - 1
        assert np.sum(side.token_span == encoded.num_spans - 1) == 1  # the EOS alone
        assert side.input_ids.shape[0] == side.prompt_length + side.response_length


def test_eos_span_off_keeps_the_paper_behaviour(student_tokenizer, teacher_tokenizer):
    encoder = PairEncoder(student_tokenizer, teacher_tokenizer, EncodingConfig(eos_span=False))
    (encoded,) = encoder.encode_responses("Question: why?", [" Because it is good."])
    assert encoded.num_spans == encoded.alignment.num_spans
    assert encoded.student.input_ids[-1] != student_tokenizer.eos_token_id
    assert _response_bytes(encoded.student, student_tokenizer, eos_span=False) == " Because it is good."


def test_raw_prompt_uses_each_tokenizers_own_start_tokens(student_tokenizer, teacher_tokenizer):
    encoder = PairEncoder(student_tokenizer, teacher_tokenizer, EncodingConfig())
    # The tiny teacher (like Gemma) prepends <bos>; the tiny student (like SmolLM2) adds nothing.
    assert encoder.prompt_ids("Hello there", "teacher")[0] == teacher_tokenizer.bos_token_id
    assert encoder.prompt_ids("Hello there", "student") == student_tokenizer("Hello there")["input_ids"]


def test_empty_prompt_starts_from_eos_where_there_is_no_bos(student_tokenizer, teacher_tokenizer):
    encoder = PairEncoder(student_tokenizer, teacher_tokenizer, EncodingConfig())
    (encoded,) = encoder.encode_responses("", ["Some text."])
    assert encoded.student.input_ids[0] == student_tokenizer.eos_token_id and encoded.student.prompt_length == 1
    assert encoded.teacher.input_ids[0] == teacher_tokenizer.bos_token_id and encoded.teacher.prompt_length == 1


def test_empty_response_has_only_the_eos_span(student_tokenizer, teacher_tokenizer):
    encoder = PairEncoder(student_tokenizer, teacher_tokenizer, EncodingConfig())
    (encoded,) = encoder.encode_responses("Prompt", [""])
    assert encoded.alignment.num_spans == 0 and encoded.num_spans == 1
    assert encoded.student.token_span.tolist() == [0] and encoded.teacher.token_span.tolist() == [0]


def test_chat_template_renders_each_models_own_template(student_tokenizer, teacher_tokenizer):
    student_tokenizer = _copy_with_template(student_tokenizer, CHAT_TEMPLATE)
    teacher_tokenizer = _copy_with_template(teacher_tokenizer, CHAT_TEMPLATE.replace("<|", "[").replace("|>", "]"))
    encoder = PairEncoder(student_tokenizer, teacher_tokenizer, EncodingConfig(prompt_format="chat_template"))
    student_prompt = encoder.prompt_ids("Hi", "student")
    assert student_tokenizer.decode(student_prompt) == "<|user|>Hi\n<|assistant|>"
    rendered = teacher_tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered == "[user]Hi\n[assistant]"
    assert encoder.prompt_ids("Hi", "teacher") == teacher_tokenizer(rendered, add_special_tokens=False)["input_ids"]


def test_chat_template_missing_is_a_clear_error(student_tokenizer, teacher_tokenizer):
    with pytest.raises(ValueError, match="no chat template; set prompt_format: raw"):
        PairEncoder(student_tokenizer, teacher_tokenizer, EncodingConfig(prompt_format="chat_template"))


def test_bad_config_is_a_clear_error():
    with pytest.raises(ValueError, match="length_unit"):
        EncodingConfig(length_unit="bytes")
    with pytest.raises(ValueError, match="max_prompt_tokens"):
        EncodingConfig(max_response_tokens=0)


@pytest.mark.real_model
def test_real_pair_with_smollm2_chat_template(real_student_tokenizer, real_teacher_tokenizer):
    """SmolLM2-Instruct has a ChatML template, Gemma-3 base has none: raw works for both, and a long
    response truncated on student tokens is covered identically by Gemma."""
    encoder = PairEncoder(real_student_tokenizer, real_teacher_tokenizer, EncodingConfig(max_response_tokens=16))
    response = " It was a bright, cold day in April, and the clocks were striking thirteen. " * 3
    chosen, rejected = encoder.encode_responses("Write a first line.", [response, " No."])
    assert chosen.truncated and not rejected.truncated
    assert chosen.student.response_length <= 16
    assert chosen.alignment.covered_bytes == len(chosen.response.encode())
    assert real_teacher_tokenizer.decode(chosen.teacher.input_ids[chosen.teacher.prompt_length :].tolist()) == (
        chosen.response
    )
    assert encoder.prompt_ids("x", "teacher")[0] == real_teacher_tokenizer.bos_token_id
    assert rejected.teacher.input_ids[-1] == real_teacher_tokenizer.eos_token_id
    assert real_student_tokenizer.chat_template
    with pytest.raises(ValueError, match="teacher tokenizer has no chat template"):
        PairEncoder(real_student_tokenizer, real_teacher_tokenizer, EncodingConfig(prompt_format="chat_template"))


def _copy_with_template(tokenizer, template):
    import copy

    clone = copy.deepcopy(tokenizer)
    clone.chat_template = template
    return clone
