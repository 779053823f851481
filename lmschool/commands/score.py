"""`lmschool score`: print a reward model's reward for one answer to a prompt.

    lmschool score runs/reward --prompt "What is two plus three?" --response "Two plus three is five."
    lmschool score runs/reward --prompt "..." --response "..." --system "Be brief." --raw

CKPT is a reward run directory or model directory (from `lmschool reward`). The prompt is one user
turn (after an optional system message), rendered through the tokenizer's chat template; the
reward is the score at the answer's closing <|im_end|> minus the checkpoint's reward_bias (the
SFT policy's answers average 0). --raw prints the score without the bias.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CKPT", help="reward model: run directory or model directory")
    parser.add_argument("--prompt", required=True, help="the user's message")
    parser.add_argument("--response", required=True, help="the assistant's answer to score")
    parser.add_argument("--system", default=None, help="an optional system message before the prompt")
    parser.add_argument("--raw", action="store_true", help="print the raw score (the bias not subtracted)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")


def run(args: argparse.Namespace) -> int:
    from lmschool.data.jsonl import check_conversation
    from lmschool.errors import UserError
    from lmschool.judges import RewardModelJudge
    from lmschool.runtime import pick_device

    prompt = ([{"role": "system", "content": args.system}] if args.system else [])
    prompt.append({"role": "user", "content": args.prompt})
    if not args.response.strip():
        raise UserError("--response is empty; give the answer to score")
    check_conversation(prompt + [{"role": "assistant", "content": args.response}], "--prompt/--response")
    judge = RewardModelJudge(args.checkpoint, None, pick_device(args.device), where="`lmschool score`",
                             bias=0.0 if args.raw else None)
    (reward,), _ = judge([prompt], [args.response])
    print(f"{reward:.4f}")
    return 0
