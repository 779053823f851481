"""Stage 3, collecting feedback: the policy writes K answers per prompt, a rater ranks them, and
each ranking becomes preference pairs (InstructGPT sec. 3.5).

    lmschool label --policy runs/sft --prompts runs/world/prompts.jsonl --samples 4 \\
        --out runs/label/prefs.jsonl [--config configs/label.yaml] [--scorer module:function] \\
        [--rater-temperature T] [--force] [key=value ...]

--prompts is JSONL of {"prompt": "..." | [messages ending with a user turn]} (other keys, such as
"category", are kept), e.g. the school world's prompts.jsonl. Steps:

1. Sample: every prompt K times from the policy (`lmschool.generate.generate`: batched, KV
   cache, seeded; temperature 1 by default, so the K answers differ). Copies of a prompt sit in one
   batch, batches are ordered by prompt length, and batch b draws from seed (seed, b): the same
   seed, batch_size and policy give the same answers. A progress bar shows the ETA.
2. Rate: each answer gets the noise-free score of the judge: the school world's teacher (the
   world.json beside --prompts, else the default world) or --scorer module:function, a
   (prompts, responses) -> [float] function. The rater ranks a prompt's K answers by score plus
   Gumbel noise of scale T (`rater_temperature`; the teacher's calibrated RATER_TEMPERATURE by
   default, 0 = noise-free for a --scorer): a Plackett-Luce ranking whose every pair is ordered as
   `teacher.choose` orders two answers, sigmoid(score gap / T), so the pairs agree with the
   noise-free teacher as often as the world's rater does (about three in four).
3. Pairs: all C(K, 2) pairs of a ranking (or a seeded `pairs_per_group` of them), the higher ranked
   one chosen. Pairs whose answers score the same (identical answers among them) carry no
   preference and are dropped and counted; so are empty answers.
4. Write --out in the school world's prefs.jsonl form (TRL conversational): {"prompt", "chosen":
   [assistant message], "rejected": [...], "category", "split", "group", "gold_chosen",
   "score_chosen", "score_rejected"}: group = the prompt's index, split = "test" for a seeded
   `test_fraction` of the prompt groups, gold_chosen = whether the noise-free judge agrees. Beside
   it, NAME.summary.json: rater agreement with the noise-free judge (observed and expected), ties
   and empty answers dropped, answers cut by max_new_tokens, the policy's mean score, tokens/s.

Nothing is written until every answer is rated; an existing --out is kept unless --force.
--resume (as `lmschool run` passes it) does nothing when --out and its summary both exist.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from lmschool import config as config_lib
from lmschool.checkpoint import load_model
from lmschool.config import check
from lmschool.errors import UserError
from lmschool.files import atomic_write_text, check_output_file, clean_leftovers


@dataclass
class LabelConfig:
    """Sampling answers, rating them, and turning the rankings into pairs."""

    samples: int = 4
    """K: answers sampled per prompt (InstructGPT: 4 to 9)."""
    max_prompts: int = 0
    """Use the first N prompts of the file (0 = all)."""
    max_new_tokens: int = 96
    """Longest answer in tokens (an answer cut here is kept and counted as unfinished)."""
    temperature: float = 1.0
    """Sampling temperature of the policy (1 = its own distribution)."""
    top_k: int = 0
    """Keep the k most likely tokens when sampling (0 = off)."""
    top_p: float = 1.0
    """Nucleus sampling mass (1.0 = off)."""
    rater_temperature: float | None = None
    """Rater noise: scale of the Gumbel noise on scores; null = the school world's RATER_TEMPERATURE with the teacher, 0 (noise-free) with a --scorer."""
    pairs_per_group: int = 0
    """Pairs kept per prompt, a seeded choice among the untied ones (0 = all C(K, 2))."""
    test_fraction: float = 0.1
    """Share of prompt groups marked "split": "test" (held out for the reward model's evaluation)."""
    batch_size: int = 64
    """Answers sampled at once (a multiple of samples keeps a prompt's copies together)."""
    seed: int = 0
    """Seed of sampling, rater noise, pair choice and the test split."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """Sample in bf16 autocast, fp32, or auto (bf16 where the hardware runs it fast)."""
    compile: bool = False
    """Compile the policy for generation (compile_for_generation: a one-off 10-40 s, then faster steps)."""
    device: str = "auto"
    """cpu, cuda, cuda:N or auto."""
    threads: int = 0
    """CPU threads for torch (0 = torch's default)."""

    def __post_init__(self):
        check(self.samples >= 2, "samples", "must be >= 2 (a pair needs two answers)")
        check(self.max_prompts >= 0, "max_prompts", "must be >= 0")
        check(self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1")
        check(self.temperature > 0, "temperature", "must be > 0 (greedy answers to one prompt would all be the same)")
        check(self.top_k >= 0, "top_k", "must be >= 0")
        check(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        check(self.rater_temperature is None or self.rater_temperature >= 0, "rater_temperature", "must be >= 0")
        check(self.pairs_per_group >= 0, "pairs_per_group", "must be >= 0")
        check(0 <= self.test_fraction < 1, "test_fraction", "must be in [0, 1)")
        check(self.batch_size >= 1, "batch_size", "must be >= 1")
        check(self.threads >= 0, "threads", "must be >= 0")


CONFIG = LabelConfig  # what `lmschool run` checks every stage's overrides against before it starts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--policy", required=True, metavar="CKPT", help="the policy that answers (e.g. the SFT run)")
    parser.add_argument("--prompts", type=Path, required=True, metavar="FILE",
                        help='prompts JSONL: {"prompt": "..." | [messages]} per line (e.g. prompts.jsonl)')
    parser.add_argument("--out", type=Path, required=True, metavar="FILE", help="preference JSONL to write")
    parser.add_argument("--samples", type=int, metavar="K", help="answers per prompt (config key samples; default 4)")
    parser.add_argument("--scorer", metavar="MODULE:FUNCTION",
                        help="rate with this (prompts, responses) -> [float] function instead of the school world's teacher")
    parser.add_argument("--rater-temperature", type=float, metavar="T",
                        help="rater noise (config key rater_temperature; 0 = noise-free)")
    parser.add_argument("--config", type=Path, metavar="FILE", help="YAML file of config values")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--force", action="store_true", help="replace --out if it exists")
    group.add_argument("--resume", action="store_true",
                       help="do nothing if --out and its summary are already written (else label as usual)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (e.g. max_prompts=300)")
    parser.add_argument("--help-config", action="store_true", help="list every config key with its default and meaning")


def load_config(args: argparse.Namespace) -> LabelConfig:
    if args.help_config:
        print("\n".join(config_lib.describe(LabelConfig)))
        raise SystemExit(0)
    overrides = list(args.overrides)
    if args.samples is not None:
        overrides.append(f"samples={args.samples}")
    if args.rater_temperature is not None:
        overrides.append(f"rater_temperature={args.rater_temperature}")
    return config_lib.load(LabelConfig, args.config, overrides)


def summary_path(out: Path) -> Path:
    """prefs.jsonl -> prefs.summary.json, beside it."""
    return out.with_name(out.stem + ".summary.json")


# ---- sampling ---------------------------------------------------------------------------------------

@dataclass
class Answer:
    prompt: int          # index into the prompt rows
    text: str            # decoded, special tokens and surrounding space removed
    tokens: int          # generated tokens (the stop token included)
    finished: bool       # ended with a stop token (not cut by max_new_tokens)


def draw_candidates(model, tokenizer, prompt_ids: list[list[int]], cfg: LabelConfig, *, progress: bool = True
                   ) -> list[list[Answer]]:
    """K answers per prompt (see the module docstring for the batching and seeding)."""
    from lmschool.generate import generate
    from lmschool.runtime import Progress

    K, context = cfg.samples, model.config.max_position_embeddings
    order = sorted(range(len(prompt_ids)), key=lambda i: (len(prompt_ids[i]), i))
    items = [i for i in order for _ in range(K)]                              # K copies, adjacent
    chunks = [items[s:s + cfg.batch_size] for s in range(0, len(items), cfg.batch_size)]
    answers: list[list[Answer]] = [[] for _ in prompt_ids]
    pad_id = tokenizer.fill_id
    bar = Progress(len(chunks), 0, "label", progress)
    every = max(1, len(chunks) // 10)
    try:
        for b, chunk in enumerate(chunks):
            room = context - max(len(prompt_ids[i]) for i in chunk)
            out = generate(model, [prompt_ids[i] for i in chunk], max_new_tokens=min(cfg.max_new_tokens, room),
                           temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                           stop_ids=tokenizer.stop_ids, pad_id=pad_id,
                           seed=int(np.random.default_rng([cfg.seed, b]).integers(2 ** 62)))
            for i, tokens, finished in zip(chunk, out.tokens, out.finished):
                text = tokenizer.decode(tokens, skip_special=True).strip()
                answers[i].append(Answer(i, text, len(tokens), finished))
            bar.update(b + 1, {}, (b + 1) % every == 0 or b + 1 == len(chunks))
    finally:
        bar.close()
    return answers


# ---- rating and pairs ---------------------------------------------------------------------------------

def rank(scores: list[float], temperature: float, rng: np.random.Generator) -> list[int]:
    """A noisy rater's ranking of answers (indices, best first): sorted by score / T + Gumbel noise,
    a Plackett-Luce draw with weights exp(score / T). Any two answers are then ordered as in
    Bradley-Terry, a before b with probability sigmoid((score_a - score_b) / T) (Luce's choice
    axiom), the rule of `lmschool.world.teacher.choose`. T = 0: by score, ties in index order."""
    s = np.asarray(scores, dtype=np.float64)
    noise = rng.gumbel(size=len(s))                       # drawn even at T = 0: same stream either way
    keys = s / temperature + noise if temperature > 0 else s
    return sorted(range(len(s)), key=lambda i: (-keys[i], i))


def ranking_pairs(scores: list[float], ranking: list[int], cap: int, rng: np.random.Generator
                  ) -> tuple[list[tuple[int, int]], int]:
    """(chosen, rejected) index pairs of a ranking: every pair of answers whose scores differ, the
    higher ranked one chosen; at most `cap` of them, a seeded choice (0 = all). Returns the pairs
    and how many tied pairs were dropped."""
    position = {a: p for p, a in enumerate(ranking)}
    pairs, ties = [], 0
    for a, b in combinations(range(len(scores)), 2):
        if scores[a] == scores[b]:
            ties += 1
            continue
        pairs.append((a, b) if position[a] < position[b] else (b, a))
    if cap and len(pairs) > cap:
        keep = sorted(rng.choice(len(pairs), size=cap, replace=False).tolist())
        pairs = [pairs[k] for k in keep]
    return pairs, ties


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


def label(rows: list[dict], answers: list[list[Answer]], scores: list[list[float]], cfg: LabelConfig,
          temperature: float) -> tuple[list[dict], dict]:
    """Preference lines from rated answers, and the counts for the summary."""
    n_test = round(len(rows) * cfg.test_fraction)
    test = set(np.random.default_rng([cfg.seed, 3]).choice(len(rows), size=n_test, replace=False).tolist()) \
        if n_test else set()
    lines, ties, empty, agreed, expected = [], 0, 0, 0, []
    for g, row in enumerate(rows):
        kept = [k for k, a in enumerate(answers[g]) if a.text]
        empty += len(answers[g]) - len(kept)
        s = [scores[g][k] for k in kept]
        rng = np.random.default_rng([cfg.seed, 11, g])
        pairs, tied = ranking_pairs(s, rank(s, temperature, rng), cfg.pairs_per_group, rng)
        ties += tied
        for c, r in pairs:
            chosen, rejected = answers[g][kept[c]], answers[g][kept[r]]
            gold = s[c] > s[r]
            agreed += gold
            expected.append(_sigmoid(abs(s[c] - s[r]) / temperature) if temperature > 0 else 1.0)
            line = {"prompt": row["prompt"], "chosen": [{"role": "assistant", "content": chosen.text}],
                    "rejected": [{"role": "assistant", "content": rejected.text}]}
            if row.get("category") is not None:
                line["category"] = row["category"]
            line.update(split="test" if g in test else "train", group=g, gold_chosen=bool(gold),
                        score_chosen=s[c], score_rejected=s[r])
            lines.append(line)
    counts = {"pairs": len(lines), "pairs_train": sum(x["split"] == "train" for x in lines),
              "pairs_test": sum(x["split"] == "test" for x in lines),
              "groups_test": len(test), "ties_dropped": ties, "empty_answers_dropped": empty,
              "rater_agreement": agreed / len(lines) if lines else None,
              "rater_agreement_expected": float(np.mean(expected)) if expected else None}
    return lines, counts


def rate(rows: list[dict], answers: list[list[Answer]], judge) -> list[list[float]]:
    """The noise-free score of every answer by a judges.Judge: the teacher's rubric total, or the
    scorer's value. All answers go to the judge at once, each prompt's K answers together."""
    from lmschool.judges import row_fields

    flat = [(g, a) for g, group in enumerate(answers) for a in group]
    values, _ = judge([rows[g]["prompt"] for g, _ in flat], [a.text for _, a in flat],
                      **row_fields([rows[g] for g, _ in flat]))
    out: list[list[float]] = [[] for _ in answers]
    for (g, _), v in zip(flat, values):
        out[g].append(v)
    return out


# ---- the command ------------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> int:
    from lmschool.data.prompts import read_prompts
    from lmschool.generate import compile_for_generation
    from lmschool.judges import make_judge
    from lmschool.runtime import autocast, pick_device, resolve_precision
    from lmschool.stages.common import check_vocab, open_init
    from lmschool.world.teacher import RATER_TEMPERATURE

    cfg = load_config(args)
    t0 = time.time()
    out: Path = args.out
    summary_file = summary_path(out)
    # --- everything is checked before anything is written ---
    for target in (out, summary_file):
        if target.is_dir():
            raise UserError(f"--out {out}: {target} is a directory; give a file name such as prefs.jsonl")
    for target in (out, summary_file):   # what a write killed midway left beside them
        for note in clean_leftovers(target):
            print(f"label: {note}")
    if args.resume and out.is_file() and summary_file.is_file():
        print(f"label: {out} is already written ({summary_file}); nothing to do")
        return 0
    for target in (out, summary_file):
        # --resume with only the summary written (--out is written last) labels again
        if target.exists() and not (args.force or args.resume):
            raise UserError(f"--out {out}: {target} exists; pass --force to replace it or choose another name")
    check_output_file(out, force=True)   # a writable place, before any answer is sampled
    policy, tokenizer = open_init(args.policy, "--policy")
    rows = read_prompts(args.prompts)
    if cfg.max_prompts:
        rows = rows[:cfg.max_prompts]
    judge = make_judge(args.scorer, beside=[args.prompts], probe=rows[0])
    temperature = cfg.rater_temperature
    if temperature is None:
        temperature = 0.0 if args.scorer not in (None, "teacher") else RATER_TEMPERATURE
    device = pick_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model = load_model(policy, head="lm", device=device).eval()
    check_vocab(model, tokenizer, f"--policy {policy}")
    context = model.config.max_position_embeddings
    prompt_ids = [tokenizer.render(r["prompt"], add_generation_prompt=True)[0] for r in rows]
    usable = [i for i, p in enumerate(prompt_ids) if len(p) < context]
    skipped = len(rows) - len(usable)
    rows, prompt_ids = [rows[i] for i in usable], [prompt_ids[i] for i in usable]
    if not rows:
        raise UserError(f"{args.prompts}: every prompt is longer than the policy's context of {context} tokens")
    sampler = compile_for_generation(model) if cfg.compile else model
    precision = resolve_precision(device, cfg.precision)
    print(f"label: {len(rows)} prompts x {cfg.samples} answers from {policy}", file=sys.stderr, flush=True)

    t_sample = time.time()
    with autocast(device, precision):
        answers = draw_candidates(sampler, tokenizer, prompt_ids, cfg)
    sample_seconds = time.time() - t_sample
    t_rate = time.time()
    scores = rate(rows, answers, judge)
    lines, counts = label(rows, answers, scores, cfg, temperature)
    rate_seconds = time.time() - t_rate
    if not lines:
        raise UserError("no pairs: every prompt's answers scored the same (or were empty); sample more "
                        "answers (--samples), at a higher temperature, or from another policy")

    all_answers = [a for group in answers for a in group]
    all_scores = [s for group in scores for s in group]
    by_category: dict[str, list[float]] = {}
    for row, group in zip(rows, scores):
        by_category.setdefault(str(row.get("category", "all")), []).extend(group)
    generated = sum(a.tokens for a in all_answers)
    summary = {
        "policy": str(policy), "prompts_file": str(args.prompts), "scorer": args.scorer or "teacher",
        "prompts": len(rows), "prompts_skipped_too_long": skipped, "samples_per_prompt": cfg.samples,
        "answers": len(all_answers), **counts,
        "possible_pairs": len(rows) * math.comb(cfg.samples, 2),
        "rater_temperature": temperature,
        "unfinished_answers": sum(not a.finished for a in all_answers),
        "policy_score": float(np.mean(all_scores)),
        "policy_score_by_category": {c: float(np.mean(v)) for c, v in sorted(by_category.items())},
        "distinct_answers_per_prompt": float(np.mean([len({a.text for a in g}) for g in answers])),
        "generated_tokens": generated, "tokens_per_s": generated / max(sample_seconds, 1e-9),
        "sample_seconds": sample_seconds, "rate_seconds": rate_seconds, "precision": precision,
        "config": config_lib.to_dict(cfg),
    }
    summary["seconds"] = time.time() - t0
    out.parent.mkdir(parents=True, exist_ok=True)
    # the summary first: a written --out means the run is complete (`lmschool run` checks it)
    atomic_write_text(summary_file, json.dumps(summary, indent=2) + "\n")
    atomic_write_text(out, "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines))
    print_summary(summary, out)
    return 0


def print_summary(s: dict, out: Path) -> None:
    def pct(v):
        return "n/a" if v is None else f"{v:.1%}"

    print(f"label: {s['pairs']} pairs ({s['pairs_train']} train, {s['pairs_test']} test) from {s['prompts']} "
          f"prompts x {s['samples_per_prompt']} answers in {s['seconds']:.0f}s -> {out}")
    print(f"label: rater agreement with the noise-free {'teacher' if s['scorer'] == 'teacher' else 'scorer'} "
          f"{pct(s['rater_agreement'])} (expected {pct(s['rater_agreement_expected'])}, rater temperature "
          f"{s['rater_temperature']:g}); {s['ties_dropped']} tied pairs and {s['empty_answers_dropped']} empty "
          f"answers dropped; {s['unfinished_answers']} answers cut at max_new_tokens; policy score "
          f"{s['policy_score']:.3f}; {s['tokens_per_s']:.0f} generated tokens/s")
