"""From (prompt, response) strings to model inputs on both sides, with aligned spans.

Rules (method §3.5, and where we deliberately differ from the authors' code):

* **Truncate text, not tokens.** The authors truncate each side's tokens separately, so the two sides cover
  different amounts of the response and the tail spans mismatch. Here the *response text* is cut so that it
  fits ``max_response_tokens`` tokens of the counting tokenizer (the student's unless ``length_unit`` says
  ``teacher``); both tokenizers then tokenize the identical, shorter string. The cut falls before the first
  token that would not fit, so it never splits a character. The prompt is cut the same way, keeping its
  *end* (the text closest to the response), so both models condition on the identical prompt string.
* **EOS is an event both models predict.** With ``eos_span`` (default on) each side appends its own EOS
  token and the pair of EOS tokens forms a final span of its own, so the loss sees "the response ends here".
  ``eos_span=False`` keeps the paper's behaviour: no EOS, so the end of the response is never scored.
  A truncated response did not end where it was cut, so it gets no EOS span.
* **Prompt format.** ``raw``: the prompt text followed by the response text, each tokenized on its own (so
  span offsets start at 0 and the first response token never merges with prompt text), with the special
  tokens the tokenizer itself puts at the start of a text (Gemma's ``<bos>``; SmolLM2 adds none).
  ``chat_template``: each model's own chat template renders a one-turn user message with the generation
  prompt, and the response follows it. When a side's prompt would be empty, its EOS token stands in as the
  start of context (the GPT-2 convention), since the first response token needs a position to be predicted
  from.
* **A conversation is rendered by each model's chat template.** A conversational row (``PreferencePair.messages``:
  system turns, several turns) has its prompt rendered by each tokenizer's own template
  (:func:`render_prompt`: ``apply_chat_template(messages, add_generation_prompt=True)``) whatever
  ``prompt_format`` says, falling back to the plain rendering (``ctpd_core.data.plain_prompt``, after the
  tokenizer's own start tokens) for a tokenizer without one. The response stays the identical text on both
  sides, so the byte-level span alignment is unchanged. Over ``max_prompt_tokens`` (counted on the counting
  tokenizer's rendering), the oldest exchanges are dropped first (a first system turn and the last user turn
  stay), then the last user turn is cut keeping its end; both sides render the same shortened conversation.
  Anything else that renders a student prompt (sampling, chat) calls :func:`render_prompt` too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from ctpd_core.alignment import SpanAlignment, TokenizedText, align_spans, tokenize_with_byte_offsets
from ctpd_core.data import Message, plain_prompt
from ctpd_core.spec import SequenceSpec

PromptFormat = Literal["raw", "chat_template"]
LengthUnit = Literal["student", "teacher"]


def _sequence_default(name: str) -> Any:
    return SequenceSpec.model_fields[name].default


@dataclass(frozen=True)
class EncodingConfig:
    """How responses are cut and encoded: the JobSpec's ``sequence`` section, whose defaults (the one place they
    live) these read, for callers that build one without a spec."""

    max_prompt_tokens: int = _sequence_default("max_prompt_tokens")
    max_response_tokens: int = _sequence_default("max_response_tokens")
    length_unit: LengthUnit = _sequence_default("length_unit")
    eos_span: bool = _sequence_default("eos_span")
    prompt_format: PromptFormat = _sequence_default("prompt_format")

    def __post_init__(self) -> None:
        if self.max_prompt_tokens < 1 or self.max_response_tokens < 1:
            raise ValueError(
                f"max_prompt_tokens and max_response_tokens must be >= 1 (got {self.max_prompt_tokens}, "
                f"{self.max_response_tokens})"
            )
        if self.length_unit not in ("student", "teacher"):
            raise ValueError(f"length_unit must be 'student' or 'teacher', not {self.length_unit!r}")
        if self.prompt_format not in ("raw", "chat_template"):
            raise ValueError(f"prompt_format must be 'raw' or 'chat_template', not {self.prompt_format!r}")


@dataclass(frozen=True)
class EncodedSide:
    """One (prompt, response) under one tokenizer.

    ``input_ids`` = prompt tokens then response tokens (then EOS when it is a span). ``token_span`` gives the
    span of each response token (and of the EOS), in order; response token j sits at position
    ``prompt_length + j`` and is predicted from position ``prompt_length + j - 1``.
    """

    input_ids: np.ndarray  # [P + R] int64
    prompt_length: int
    token_span: np.ndarray  # [R] int64

    @property
    def response_length(self) -> int:
        return int(self.token_span.shape[0])


@dataclass(frozen=True)
class EncodedResponse:
    response: str  # the (possibly truncated) response text both sides cover
    truncated: bool
    alignment: SpanAlignment
    num_spans: int  # alignment spans, plus one when the EOS span is on
    student: EncodedSide
    teacher: EncodedSide


def _special_prefix(tokenizer: Any) -> list[int]:
    """The special tokens ``tokenizer`` puts at the start of a text by itself (e.g. Gemma's <bos>)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    start = _find_sublist(full, plain)
    return list(full[:start]) if start is not None else []


def _find_sublist(haystack: Sequence[int], needle: Sequence[int]) -> int | None:
    for start in range(len(haystack) - len(needle) + 1):
        if list(haystack[start : start + len(needle)]) == list(needle):
            return start
    return None


def truncate_text(text: str, tokenizer: Any, max_tokens: int, keep: Literal["start", "end"] = "start") -> str:
    """The longest part of ``text`` (its start, or its end) that ``tokenizer`` encodes in <= ``max_tokens``.

    Cuts on character offsets, before the first token that does not fit, then re-tokenizes to check: BPE is
    not perfectly prefix-stable, so a few rounds may be needed.
    """
    for _ in range(16):
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = encoded["offset_mapping"]
        if len(offsets) <= max_tokens:
            return text
        if keep == "start":
            text = text[: offsets[max_tokens][0]]
        else:
            text = text[offsets[len(offsets) - max_tokens - 1][1] :]
    raise ValueError(f"could not truncate a text to {max_tokens} tokens in 16 rounds; shorten it in the dataset")


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_prompt(tokenizer: Any, messages: Sequence[Message]) -> str | None:
    """``messages`` as ``tokenizer``'s own chat template renders them for the model to answer (the generation
    prompt added, special tokens as text), or None when the tokenizer has no template. The one rendering of a
    conversational prompt: the prepare stage's, and any sampling from or chat with the student."""
    if not has_chat_template(tokenizer):
        return None
    conversation = [{"role": role, "content": content} for role, content in messages]
    try:
        rendered = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    except Exception as error:  # jinja2's TemplateError (a template's raise_exception), or a missing variable
        raise ValueError(f"the tokenizer's chat template refuses this conversation ({error}); make it a first "
                         "system turn (optional) then alternating user and assistant turns ending with a user turn") \
            from error
    if not isinstance(rendered, str):
        raise ValueError(f"the tokenizer's chat template rendered a {type(rendered).__name__}, not text")
    return rendered


class PairEncoder:
    """Encodes (prompt, response) pairs for a student/teacher tokenizer pair under one :class:`EncodingConfig`."""

    def __init__(self, student_tokenizer: Any, teacher_tokenizer: Any, config: EncodingConfig) -> None:
        self.student_tokenizer = student_tokenizer
        self.teacher_tokenizer = teacher_tokenizer
        self.config = config
        for role, tokenizer in (("student", student_tokenizer), ("teacher", teacher_tokenizer)):
            if config.eos_span and tokenizer.eos_token_id is None:
                raise ValueError(f"the {role} tokenizer defines no EOS token; set eos_span: false")
            if config.prompt_format == "chat_template" and not getattr(tokenizer, "chat_template", None):
                raise ValueError(
                    f"the {role} tokenizer has no chat template; set prompt_format: raw "
                    "(or use a model folder whose tokenizer_config.json has one)"
                )
        self._prefix = {"student": _special_prefix(student_tokenizer), "teacher": _special_prefix(teacher_tokenizer)}

    @property
    def counting_role(self) -> Literal["student", "teacher"]:
        """The side whose tokens the length budgets count (``length_unit``)."""
        return "student" if self.config.length_unit == "student" else "teacher"

    @property
    def counting_tokenizer(self) -> Any:
        return self._tokenizer(self.counting_role)

    def _tokenizer(self, role: Literal["student", "teacher"]) -> Any:
        return self.student_tokenizer if role == "student" else self.teacher_tokenizer

    def prompt_ids(self, prompt: str, role: Literal["student", "teacher"],
                   messages: Sequence[Message] | None = None) -> list[int]:
        """The prompt's token ids on one side (after :meth:`truncate_prompt`, or for ``messages`` after
        :meth:`truncate_messages`): a conversation through the side's chat template, or its plain rendering."""
        tokenizer = self._tokenizer(role)
        if messages is not None:
            return self._conversation_ids(tokenizer, role, messages)
        if self.config.prompt_format == "chat_template":  # a text prompt as one user turn (the template is checked)
            rendered = render_prompt(tokenizer, [("user", prompt)]) or ""
            ids = list(tokenizer(rendered, add_special_tokens=False)["input_ids"])
        else:
            ids = self._prefix[role] + (list(tokenizer(prompt, add_special_tokens=False)["input_ids"]) if prompt else [])
        return ids or [tokenizer.eos_token_id]

    def _conversation_ids(self, tokenizer: Any, role: Literal["student", "teacher"],
                          messages: Sequence[Message]) -> list[int]:
        rendered = render_prompt(tokenizer, messages)
        if rendered is not None:
            ids = list(tokenizer(rendered, add_special_tokens=False)["input_ids"])
        else:
            ids = self._prefix[role] + list(tokenizer(plain_prompt(messages), add_special_tokens=False)["input_ids"])
        return ids or [tokenizer.eos_token_id]

    def _counted(self, messages: Sequence[Message]) -> int:
        return len(self._conversation_ids(self.counting_tokenizer, self.counting_role, messages))

    def truncate_messages(self, messages: Sequence[Message]) -> tuple[Message, ...]:
        """The conversation within ``max_prompt_tokens`` of the counting tokenizer's rendering: the oldest
        exchanges (a user turn and the assistant reply after it) dropped first, keeping a first system turn and
        the last user turn, then the last user turn cut keeping its end (the text closest to the response)."""
        limit = self.config.max_prompt_tokens
        kept = list(messages)
        count = self._counted(kept)  # a render and a tokenization: counted again only once `kept` changed
        if count <= limit:
            return tuple(kept)
        first = 1 if kept[0][0] == "system" else 0
        while len(kept) - first > 1 and count > limit:
            del kept[first:first + 2]  # rows alternate user/assistant from `first` (ctpd_core.data checks)
            count = self._counted(kept)
        over = count - limit
        role, content = kept[-1]
        for _ in range(8):
            if over <= 0:
                return tuple(kept)
            budget = len(self.counting_tokenizer(content, add_special_tokens=False)["input_ids"]) - over
            if budget < 1:
                raise ValueError(
                    f"sequence.max_prompt_tokens ({limit}) leaves no room for the last user turn once the chat "
                    "template and the system turn are counted; raise max_prompt_tokens or shorten the system turn"
                )
            content = truncate_text(content, self.counting_tokenizer, budget, keep="end")
            kept[-1] = (role, content)
            over = self._counted(kept) - limit
        raise ValueError(f"could not fit a conversation into {limit} prompt tokens; shorten its last user turn")

    def truncate_prompt(self, prompt: str) -> str:
        return truncate_text(prompt, self.counting_tokenizer, self.config.max_prompt_tokens, keep="end")

    def truncate_response(self, response: str) -> str:
        return truncate_text(response, self.counting_tokenizer, self.config.max_response_tokens, keep="start")

    def encode_responses(self, prompt: str, responses: Sequence[str],
                         messages: Sequence[Message] | None = None) -> list[EncodedResponse]:
        """Encode several responses to one prompt (a chosen and a rejected one, or samples); a conversational
        prompt comes as ``messages`` (``prompt`` is then its plain rendering, unused: each side renders the
        messages itself)."""
        prompt_ids: dict[str, list[int]]
        if messages is not None:
            kept = self.truncate_messages(messages)
            prompt_ids = {role: self.prompt_ids("", role, kept) for role in ("student", "teacher")}
        else:
            prompt = self.truncate_prompt(prompt)
            prompt_ids = {role: self.prompt_ids(prompt, role) for role in ("student", "teacher")}
        cut = [self.truncate_response(response) for response in responses]
        student = tokenize_with_byte_offsets(self.student_tokenizer, cut, role="student tokenizer")
        teacher = tokenize_with_byte_offsets(self.teacher_tokenizer, cut, role="teacher tokenizer")
        return [
            self._encode_one(text, len(text) < len(original), prompt_ids, s, t)
            for original, text, s, t in zip(responses, cut, student, teacher, strict=True)
        ]

    def _encode_one(
        self,
        response: str,
        truncated: bool,
        prompt_ids: dict[str, list[int]],
        student: TokenizedText,
        teacher: TokenizedText,
    ) -> EncodedResponse:
        alignment = align_spans(student, teacher, response)
        with_eos = self.config.eos_span and not truncated
        num_spans = alignment.num_spans + int(with_eos)
        sides = {}
        for role, tokens, token_span, tokenizer in (
            ("student", student, alignment.student_span, self.student_tokenizer),
            ("teacher", teacher, alignment.teacher_span, self.teacher_tokenizer),
        ):
            response_ids = tokens.token_ids
            if with_eos:
                response_ids = np.append(response_ids, tokenizer.eos_token_id)
                token_span = np.append(token_span, alignment.num_spans)
            prompt = np.asarray(prompt_ids[role], dtype=np.int64)
            sides[role] = EncodedSide(
                input_ids=np.concatenate([prompt, response_ids]).astype(np.int64),
                prompt_length=int(prompt.shape[0]),
                token_span=token_span.astype(np.int64),
            )
        return EncodedResponse(
            response=response,
            truncated=truncated,
            alignment=alignment,
            num_spans=num_spans,
            student=sides["student"],
            teacher=sides["teacher"],
        )
