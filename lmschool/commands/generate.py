"""`lmschool generate`: print a model's continuation of a prompt, streaming as tokens come.

    lmschool generate runs/pretrain --prompt "Ada lives in" --max-new-tokens 40 --temperature 0
    lmschool generate runs/sft --chat --prompt "What is seven plus five?" --seed 1

CKPT is a model directory or a run directory (its final or latest model). A plain prompt is
encoded as text and generation stops at the end-of-document token; `--chat` renders the prompt
as one user turn through the tokenizer's chat template and stops at the end-of-turn token.
Temperature 0 is greedy. Text is printed as soon as it decodes to whole characters (a byte-level
BPE token may hold part of a UTF-8 character).
"""

from __future__ import annotations

import argparse
import sys


from lmschool.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CKPT", help="model directory or run directory")
    parser.add_argument("--prompt", required=True, help="the prompt text (with --chat: the user's message)")
    parser.add_argument("--chat", action="store_true",
                        help="render the prompt as one user turn of the chat template and stop at end of turn")
    parser.add_argument("--max-new-tokens", type=int, default=128, metavar="N", help="most tokens to generate (default 128)")
    parser.add_argument("--temperature", type=float, default=1.0, metavar="T", help="0 = greedy (default 1.0)")
    parser.add_argument("--top-k", type=int, default=0, metavar="K", help="keep the K most likely tokens; 0 = off (default)")
    parser.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling mass; 1.0 = off (default)")
    parser.add_argument("--seed", type=int, default=None, metavar="S", help="seed for reproducible samples")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda when available)")


def run(args: argparse.Namespace) -> int:
    from lmschool.checkpoint import load_model, resolve
    from lmschool.generate import SamplingConfig, stream
    from lmschool.runtime import pick_device
    from lmschool.tokenizer import TextStream, Tokenizer

    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    path = resolve(args.checkpoint)
    device = pick_device(args.device)
    model = load_model(path, head="lm", device=device).eval()
    tokenizer = Tokenizer.load(path)

    if args.chat:
        if tokenizer.end_of_turn_id is None:
            raise UserError(f"{path}: the tokenizer has no chat template with an end-of-turn token, so --chat "
                            "cannot be used; leave --chat out to continue plain text")
        prompt, _ = tokenizer.render([{"role": "user", "content": args.prompt}], add_generation_prompt=True)
        stop = list(dict.fromkeys([tokenizer.end_of_turn_id, *tokenizer.stop_ids]))
    else:
        prompt = tokenizer.encode(args.prompt)
        stop = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    if not prompt:
        raise UserError("the prompt is empty; give some text with --prompt")
    context = model.config.max_position_embeddings
    if len(prompt) >= context:
        raise UserError(f"the prompt is {len(prompt)} tokens, but the model's context is {context}; "
                        "shorten the prompt")
    max_new = sampling.max_new_tokens
    if len(prompt) + max_new > context:
        max_new = context - len(prompt)
        print(f"lmschool generate: note: --max-new-tokens cut to {max_new} to stay within the "
              f"model's context of {context} tokens", file=sys.stderr)

    kwargs = {**sampling.kwargs(), "max_new_tokens": max_new}
    text = TextStream(tokenizer)
    for token in stream(model, prompt, stop_ids=stop, **kwargs):
        sys.stdout.write(text.push(token))
        sys.stdout.flush()
    sys.stdout.write(text.flush() + "\n")
    sys.stdout.flush()
    return 0
