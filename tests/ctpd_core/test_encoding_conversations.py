"""Conversational prompts through each model's own chat template (or the plain rendering without one); the
responses stay the identical text on both sides."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from ctpd_core.data import load_pairs, plain_prompt
from ctpd_core.encoding import EncodingConfig, PairEncoder, render_prompt

FORMATS = Path(__file__).resolve().parents[2] / "examples" / "data" / "formats"
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
BRACKETS = CHAT_TEMPLATE.replace("<|", "[").replace("|>", "]")
# Gemma's way of refusing a conversation it cannot render.
STRICT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
)
SYSTEM = ("system", "Be brief.")
CONVERSATION = (SYSTEM, ("user", "I have three apples."), ("assistant", "Nice."), ("user", "How many now?"))


def _with_template(tokenizer, template):
    clone = copy.deepcopy(tokenizer)
    clone.chat_template = template
    return clone


def _prompt_text(tokenizer, side) -> str:
    return tokenizer.decode(side.input_ids[: side.prompt_length].tolist())


def _response_text(tokenizer, side) -> str:
    return tokenizer.decode(side.input_ids[side.prompt_length :].tolist(), skip_special_tokens=True)


def test_each_side_renders_the_conversation_with_its_own_template(student_tokenizer, teacher_tokenizer):
    student = _with_template(student_tokenizer, CHAT_TEMPLATE)
    teacher = _with_template(teacher_tokenizer, BRACKETS)
    encoder = PairEncoder(student, teacher, EncodingConfig())  # prompt_format raw: conversations still templated
    chosen, rejected = encoder.encode_responses(plain_prompt(CONVERSATION), [" Three.", " Two."],
                                                messages=CONVERSATION)
    expected = "<|system|>Be brief.\n<|user|>I have three apples.\n<|assistant|>Nice.\n<|user|>How many now?\n<|assistant|>"
    assert render_prompt(student, CONVERSATION) == expected
    assert chosen.student.input_ids[: chosen.student.prompt_length].tolist() == student(
        expected, add_special_tokens=False)["input_ids"]
    teacher_rendered = teacher.apply_chat_template(
        [{"role": r, "content": c} for r, c in CONVERSATION], tokenize=False, add_generation_prompt=True)
    assert teacher_rendered.startswith("[system]Be brief.") and teacher_rendered.endswith("[assistant]")
    assert chosen.teacher.input_ids[: chosen.teacher.prompt_length].tolist() == teacher(
        teacher_rendered, add_special_tokens=False)["input_ids"]
    # The responses: the same text on both sides, wholly covered by the byte-level alignment.
    for encoded, text in ((chosen, " Three."), (rejected, " Two.")):
        assert encoded.response == text
        assert encoded.alignment.covered_bytes == len(text.encode())


def test_a_side_without_a_template_falls_back_to_the_plain_rendering(student_tokenizer, teacher_tokenizer):
    student = _with_template(student_tokenizer, CHAT_TEMPLATE)
    encoder = PairEncoder(student, teacher_tokenizer, EncodingConfig())  # the tiny teacher has no template
    (encoded,) = encoder.encode_responses("", [" Three."], messages=CONVERSATION)
    plain = teacher_tokenizer("x", add_special_tokens=True)["input_ids"][:1]  # its <bos>, as in raw
    expected = plain + teacher_tokenizer(plain_prompt(CONVERSATION), add_special_tokens=False)["input_ids"]
    assert encoded.teacher.input_ids[: encoded.teacher.prompt_length].tolist() == expected
    assert _prompt_text(student, encoded.student).startswith("<|system|>Be brief.")


def test_a_long_conversation_drops_its_oldest_exchange_first(student_tokenizer, teacher_tokenizer):
    student = _with_template(student_tokenizer, CHAT_TEMPLATE)
    teacher = _with_template(teacher_tokenizer, BRACKETS)
    long = (SYSTEM, ("user", "An old question about the weather in the town long ago."), ("assistant", "An old reply."),
            ("user", "How many now?"))
    full = len(student(render_prompt(student, long), add_special_tokens=False)["input_ids"])
    short = len(student(render_prompt(student, (SYSTEM, long[-1])), add_special_tokens=False)["input_ids"])
    encoder = PairEncoder(student, teacher, EncodingConfig(max_prompt_tokens=(full + short) // 2))
    (encoded,) = encoder.encode_responses("", [" Three."], messages=long)
    assert encoded.student.prompt_length == short
    # Both sides condition on the same shortened conversation: the system turn and the last user turn.
    assert _prompt_text(teacher, encoded.teacher).replace(" ", "").startswith("[system]Bebrief.")
    assert "weather" not in _prompt_text(teacher, encoded.teacher)
    assert "How many now" in _prompt_text(student, encoded.student)


def test_an_overlong_last_turn_keeps_its_end(student_tokenizer, teacher_tokenizer):
    student = _with_template(student_tokenizer, CHAT_TEMPLATE)
    question = "Tell me everything about the school and the teachers and the town, then answer: how many now?"
    messages = (("user", question),)
    encoder = PairEncoder(student, teacher_tokenizer, EncodingConfig(max_prompt_tokens=24))  # the template: 14
    kept = encoder.truncate_messages(messages)
    assert len(student(render_prompt(student, kept), add_special_tokens=False)["input_ids"]) <= 24
    assert question.endswith(kept[-1][1]) and kept[-1][1].endswith("how many now?") and kept[-1][1] != question
    with pytest.raises(ValueError, match="leaves no room for the last user turn"):
        PairEncoder(student, teacher_tokenizer, EncodingConfig(max_prompt_tokens=3)).truncate_messages(
            ((("system", "A system prompt far longer than three tokens.")), ("user", "Hi")))


def test_a_template_that_refuses_the_conversation_is_named(student_tokenizer, teacher_tokenizer):
    student = _with_template(student_tokenizer, STRICT_TEMPLATE)
    encoder = PairEncoder(student, teacher_tokenizer, EncodingConfig())
    with pytest.raises(ValueError, match="chat template refuses this conversation .System role not supported"):
        encoder.encode_responses("", [" x"], messages=CONVERSATION)


def test_prepare_renders_the_example_conversations(student_tokenizer, teacher_tokenizer):
    from ctpd_core.pipeline import prepare

    student = _with_template(student_tokenizer, CHAT_TEMPLATE)
    pairs = load_pairs(FORMATS / "openai_preference.jsonl")
    data = prepare(pairs[:2], pairs[2:], student, teacher_tokenizer, EncodingConfig())
    chosen = data.train[1].chosen
    # The record the distillation trains on starts with the student's own rendering of the messages.
    prompt_ids = chosen.student_ids[: chosen.student_prompt_length].tolist()
    assert student.decode(prompt_ids) == render_prompt(student, pairs[1].messages)
    assert len(data.validation) == 1


@pytest.mark.real_model
def test_real_tokenizers_render_the_example_conversations(real_student_tokenizer, real_teacher_tokenizer):
    """SmolLM2-Instruct renders its ChatML template (system turn included); Gemma-3 base has no template, so it
    gets the plain rendering after its <bos>; the responses are the same bytes on both sides."""
    encoder = PairEncoder(real_student_tokenizer, real_teacher_tokenizer, EncodingConfig())
    for pair in load_pairs(FORMATS / "conversational_explicit.jsonl"):
        chosen, rejected = encoder.encode_responses(pair.prompt, [pair.chosen, pair.rejected], messages=pair.messages)
        student_prompt = real_student_tokenizer.decode(chosen.student.input_ids[: chosen.student.prompt_length])
        assert student_prompt.endswith("<|im_start|>assistant\n")
        assert f"<|im_start|>user\n{pair.messages[-1][1]}<|im_end|>" in student_prompt
        if pair.messages[0][0] == "system":
            assert f"<|im_start|>system\n{pair.messages[0][1]}<|im_end|>" in student_prompt
        teacher_prompt = chosen.teacher.input_ids[: chosen.teacher.prompt_length].tolist()
        assert teacher_prompt[0] == real_teacher_tokenizer.bos_token_id
        assert real_teacher_tokenizer.decode(teacher_prompt[1:]) == pair.prompt
        for encoded, text in ((chosen, pair.chosen), (rejected, pair.rejected)):
            assert _response_text(real_student_tokenizer, encoded.student) == text
            assert _response_text(real_teacher_tokenizer, encoded.teacher) == text
            assert encoded.alignment.covered_bytes == len(text.encode())
