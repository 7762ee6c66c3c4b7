"""Talk to a distilled student: type a prompt, read what it writes.

    .venv/bin/python examples/chat.py --model .ctpd/models/<job id>               # a prompt per line, Ctrl-D ends
    .venv/bin/python examples/chat.py --model .ctpd/models/<job id> --prompt "The weather today"

By default the prompt is continued as raw text, the format the examples' sentiment pairs train (a sentence
opening, continued positively). ``--chat`` renders each line as a user turn through the model's own chat
template instead (keeping the conversation), for students trained on conversational data. Sampling is plain
(temperature 1 by default); ``--seed`` makes a reply repeatable.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def reply(model: Any, tokenizer: Any, prompt_ids: list[int], args: argparse.Namespace) -> str:
    import torch

    from bench.quality.sampling import control_token_ids
    from ctpd_core.inference import pad_token_id

    torch.manual_seed(args.seed)
    input_ids = torch.tensor([prompt_ids])
    output = model.generate(
        input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=True,
        temperature=args.temperature, top_k=0, top_p=1.0, max_new_tokens=args.max_new_tokens,
        eos_token_id=sorted(control_token_ids(tokenizer)), pad_token_id=pad_token_id(tokenizer),
    )
    return tokenizer.decode(output[0, len(prompt_ids):], skip_special_tokens=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a model folder (a job's export) or a catalog name")
    parser.add_argument("--prompt", help="one prompt, answered once; without it, a prompt per line from stdin")
    parser.add_argument("--chat", action="store_true", help="use the model's chat template (user/assistant turns)")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--max-prompt-tokens", type=int, default=1024, help="a longer prompt keeps its end")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from transformers.utils import logging as transformers_logging

    from ctpd_core.encoding import EncodingConfig, PairEncoder, has_chat_template
    from ctpd_core.models import load_causal_lm

    transformers_logging.disable_progress_bar()
    cache = Path(os.environ.get("CTPD_HOME", REPO / ".ctpd")) / "catalog"
    model, tokenizer = load_causal_lm(args.model, cache_dir=cache)
    model.eval().requires_grad_(False)
    if args.chat and not has_chat_template(tokenizer):
        parser.error(f"{args.model} has no chat template: leave out --chat to continue raw text")
    encoder = PairEncoder(tokenizer, tokenizer, EncodingConfig(max_prompt_tokens=args.max_prompt_tokens,
                                                               max_response_tokens=args.max_new_tokens))
    conversation: list[tuple[str, str]] = []
    lines = [args.prompt] if args.prompt is not None else sys.stdin
    interactive = args.prompt is None and sys.stdin.isatty()
    if interactive:
        print("a prompt per line; Ctrl-D ends", file=sys.stderr)
    for line in lines:
        text = line.rstrip("\n")
        if not text:
            continue
        # The prompt's ids exactly as training encodes them (the prepare stage's encoder): raw text after the
        # tokenizer's own start tokens, or the conversation through the model's chat template.
        if args.chat:
            conversation.append(("user", text))
            prompt_ids = encoder.prompt_ids("", "student", encoder.truncate_messages(conversation))
        else:
            prompt_ids = encoder.prompt_ids(encoder.truncate_prompt(text), "student")
        answer = reply(model, tokenizer, prompt_ids, args)
        if args.chat:
            conversation.append(("assistant", answer))
        print(answer if args.chat else text + answer, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
