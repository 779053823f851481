"""`lmschool eval CKPT --data eval.jsonl`: answer held-out prompts with any chat checkpoint and judge them.

    lmschool eval runs/sft --data runs/world/eval.jsonl                       # the school world's teacher
    lmschool eval runs/sft --data my_prompts.jsonl --scorer mypkg.judge:score --out results.json
    lmschool eval runs/sft --data runs/world/eval.jsonl --answers answers.jsonl --temperature 0.7
    lmschool eval runs/ppo --data runs/world/eval.jsonl --reward runs/reward     # a reward model's reward

The same evaluation as at the end of `lmschool sft` (lmschool.evaluate.evaluate_generations): greedy
answers by default (in bf16 where the hardware runs it fast, as in training; --precision fp32 to
force float32), judged by the school world's teacher built from the world.json beside the data
file (else lmschool.world.teacher's default world), by --scorer module:function, a function
(prompts, responses) -> list[float], or by --reward RM_CKPT, a reward model's reward (score at the
answer's <|im_end|> minus its reward_bias); see lmschool.judges. Prints the figures per category;
--out writes them as JSON and --answers writes one JSON line per answer (prompt, response, score,
rubric parts, end of turn).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CKPT", help="model directory or run directory")
    parser.add_argument("--data", type=Path, required=True, metavar="FILE",
                        help='prompts, one JSON object per line: {"prompt": ...} (eval.jsonl) or {"messages": ...}')
    judge = parser.add_mutually_exclusive_group()
    judge.add_argument("--scorer", metavar="MODULE:FUNCTION",
                       help="a (prompts, responses) -> [float] function instead of the school world's teacher")
    judge.add_argument("--reward", metavar="RM_CKPT",
                       help="judge with this reward model (from `lmschool reward`, with CKPT's tokenizer)")
    parser.add_argument("--out", type=Path, metavar="FILE", help="write the figures here as JSON")
    parser.add_argument("--answers", type=Path, metavar="FILE", help="write every answer here as JSONL")
    parser.add_argument("--force", action="store_true", help="replace --out / --answers if they exist")
    parser.add_argument("--max-new-tokens", type=int, default=128, metavar="N", help="longest answer (default 128)")
    parser.add_argument("--batch-size", type=int, default=32, metavar="N", help="prompts answered at once (default 32)")
    parser.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy (default)")
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="sampling seed (default 0)")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                        help="bf16 autocast, fp32, or auto (bf16 where the hardware runs it fast; default)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda when available)")


def run(args: argparse.Namespace) -> int:
    from lmschool.checkpoint import load_model, resolve
    from lmschool.files import atomic_write_text, check_output_file
    from lmschool.errors import UserError
    from lmschool.data.prompts import read_prompts
    from lmschool.evaluate import evaluate_generations
    from lmschool.judges import make_judge
    from lmschool.tokenizer import check_chat_template
    from lmschool.tokenizer import Tokenizer
    from lmschool.runtime import autocast, pick_device, resolve_precision

    if args.max_new_tokens < 1 or args.batch_size < 1 or not 0 <= args.temperature < math.inf:   # nan too
        raise UserError("--max-new-tokens and --batch-size must be >= 1 and --temperature a number >= 0")
    path = resolve(args.checkpoint)
    tokenizer = Tokenizer.load(path)
    check_chat_template(tokenizer, path)
    rows = read_prompts(args.data)
    for flag, target in (("--out", args.out), ("--answers", args.answers)):
        if target is not None:
            check_output_file(target, args.force, flag)   # before the answers are sampled
    device = pick_device(args.device)
    judge = make_judge(args.scorer, args.reward, beside=[args.data], tokenizer=tokenizer, device=device,
                       batch_size=args.batch_size, policy_name=f"CKPT {path}", probe=rows[0])
    model = load_model(path, head="lm", device=device).eval()

    precision = resolve_precision(device, args.precision)
    with autocast(device, precision):
        summary, records = evaluate_generations(model, tokenizer, rows, judge, max_new_tokens=args.max_new_tokens,
                                                batch_size=args.batch_size, temperature=args.temperature,
                                                seed=args.seed)
    summary = {"checkpoint": str(path), "data": str(args.data), "scorer": judge.name,
               "eval_precision": precision, **summary}
    print_table(summary)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, json.dumps(summary, indent=2) + "\n")
    if args.answers is not None:
        args.answers.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.answers, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return 0


def print_table(s: dict) -> None:
    """Per-category figures, then the headline ones."""
    def fmt(v):
        return "  n/a" if v is None else f"{v:5.3f}"

    name = "teacher_score" if "teacher_score" in s else "score"
    by_score, by_right = s[f"{name}_by_category"], s.get("correct_by_category", {})
    print(f"{'category':<16} {'score':>6} {'correct':>8}")
    for category, value in by_score.items():
        print(f"{category:<16} {fmt(value):>6} {fmt(by_right.get(category)) if by_right else '':>8}")
    print(f"{'all':<16} {fmt(s[name]):>6} {fmt(s.get('correct')) if by_right else '':>8}")
    keys = ["correct_train_pupils", "correct_heldout_pupils", "correct_arithmetic", "refusal_correct",
            "end_of_turn_rate"]
    print("  ".join(f"{k} {fmt(s.get(k)).strip()}" for k in keys if k in s))
    if s.get("eval_skipped_too_long"):
        print(f"{s['eval_skipped_too_long']} prompts skipped: longer than the model's context")
