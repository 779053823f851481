"""Evaluation measures shared by the stages: held-out loss and bits per byte; answers to held-out
prompts judged by the school world's teacher or any `module:function` scorer
(`evaluate_generations`, used by SFT, the later stages and `lmschool eval`). More to come: reward
accuracy, win rates, KL.

Bits per byte makes losses comparable across tokenizers: the total information the model needs
for the held-out text, in bits, divided by the text's UTF-8 size. End-of-document tokens are
left out of both sides (they are not text).
"""

from __future__ import annotations

import math

import torch

from lmschool.losses.lm import token_nll


@torch.no_grad()
def lm_loss_and_bpb(model, batches, *, special_ids: set[int], bytes_per_text_token: float | None) -> dict:
    """Mean next-token loss (nats) over all targets, and bits per byte over text targets.

    bytes_per_text_token: UTF-8 bytes of the split divided by its non-special tokens (from the
    data's meta.json); None skips bits per byte.
    """
    device = next(model.parameters()).device
    total_nll, total_n, text_nll, text_n = 0.0, 0, 0.0, 0
    special = torch.tensor(sorted(special_ids), dtype=torch.long, device=device)
    for batch in batches:
        x, y = batch["input_ids"].to(device), batch["labels"].to(device)
        nll = token_nll(model(x), y).float()                                   # (B, T)
        is_text = ~torch.isin(y, special)
        total_nll += nll.sum().item()
        total_n += y.numel()
        text_nll += nll[is_text].sum().item()
        text_n += int(is_text.sum().item())
    out = {"val_loss": total_nll / max(total_n, 1), "val_tokens": total_n}
    if bytes_per_text_token and text_n:
        out["val_bpb"] = text_nll / math.log(2) / (text_n * bytes_per_text_token)
    return out


# ---- generation-based evaluation: answers to held-out prompts, judged by a scorer ------------------
#
# The model answers each prompt (greedy by default, batched, through `generate`); a scorer judges
# each answer. The default scorer is the school world's teacher, whose rubric parts give the
# correctness figures; any `module:function` taking (prompts, responses) -> list[float] can
# replace it (then only the mean score and the end-of-turn rate are reported). The stages (SFT,
# DPO, PPO) and `lmschool eval` all call `evaluate_generations`.

EVAL_FORMAT = ('expected {"prompt": "..." | [messages ending with a user turn]} (optional: "category", '
               '"heldout", "expected", "reference") or {"messages": [..., user, assistant]}')


def read_eval_rows(path) -> list[dict]:
    """Rows of an eval JSONL file, each with "prompt" as a list of messages ending in a user turn.

    A {"messages": [...]} row is taken as the prompt up to its last user turn, with the
    assistant turn after it as "reference". Other keys are kept. Raises DataError at file:line."""
    from lmschool.data.sft import check_conversation, read_jsonl
    from lmschool.errors import DataError

    rows = []
    for where, row in read_jsonl(path, EVAL_FORMAT):
        if "prompt" in row:
            prompt = row["prompt"]
            prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        elif "messages" in row:
            messages = check_conversation(row["messages"], where, need_assistant=False)
            users = [i for i, m in enumerate(messages) if m["role"] == "user"]
            if not users:
                raise DataError(f"{where}: the conversation has no user turn to answer; {EVAL_FORMAT}")
            prompt = messages[:users[-1] + 1]
            after = messages[users[-1] + 1:]
            row = {k: v for k, v in row.items() if k != "messages"}
            if after and after[0]["role"] == "assistant":
                row.setdefault("reference", after[0]["content"])
        else:
            raise DataError(f"{where}: {EVAL_FORMAT}; this line has keys {sorted(row)}")
        check_conversation(prompt, where, need_assistant=False)
        if prompt[-1]["role"] != "user":
            raise DataError(f"{where}: the prompt's last turn is {prompt[-1]['role']}; it must end "
                            "with the user turn the model answers")
        rows.append({**row, "prompt": prompt, "where": where})
    if not rows:
        raise DataError(f"{path}: holds no prompts; {EVAL_FORMAT}, one per line")
    return rows


def load_scorer(spec: str):
    """The function named by "module:function", e.g. "lmschool.world.teacher:reward". It must take
    (prompts, responses) and return one float per pair."""
    import importlib

    from lmschool.errors import UserError

    module_name, _, function_name = spec.partition(":")
    if not module_name or not function_name:
        raise UserError(f"--scorer {spec!r} must look like module:function "
                        "(e.g. lmschool.world.teacher:reward)")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(f"--scorer {spec}: cannot import module {module_name!r} ({e}); is it on "
                        "PYTHONPATH?") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise UserError(f"--scorer {spec}: module {module_name} has no function {function_name!r}")
    return function


def school_teacher(eval_path=None):
    """The school world's teacher for an eval file: the world.json beside it if there is one, else
    lmschool.world.teacher's default world (LMSCHOOL_WORLD, or the built-in default world)."""
    from pathlib import Path

    from lmschool.world.teacher import Teacher, default_teacher

    if eval_path is not None and (Path(eval_path).parent / "world.json").is_file():
        return Teacher.from_file(Path(eval_path).parent / "world.json")
    return default_teacher()


def _mean(values) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


@torch.no_grad()
def evaluate_generations(model, tokenizer, rows: list[dict], scorer, *, max_new_tokens: int = 128,
                         batch_size: int = 32, temperature: float = 0.0, seed: int = 0
                         ) -> tuple[dict, list[dict]]:
    """Answer every row's prompt and judge the answers. Returns (summary, records).

    rows: dicts with "prompt" (messages ending in a user turn; see read_eval_rows), optional
    "category" and "heldout". scorer: a `Teacher` (its rubric parts give the correctness figures)
    or a function (prompts, responses) -> list[float].

    summary, all fractions in [0, 1] (None where no row is of that kind):
      teacher_score (or score, for another scorer), and *_by_category: mean score;
      end_of_turn_rate: answers that ended with the end-of-turn token (not cut by max_new_tokens);
      with the teacher: correct (correctness part == 1) overall and by category, fact_correct,
      correct_train_pupils / correct_heldout_pupils (fact questions about pupils seen in SFT / only
      in the corpus), correct_arithmetic, refusal_correct (a refusal with a reason where due), and
      teacher_parts (mean of each rubric part).
    records: one per row, in row order: prompt, category, heldout, response, score, parts,
      end_of_turn, tokens (and the row's expected / reference / pupil, if any).
    """
    from lmschool.generate import generate

    if tokenizer.im_end_id is None:
        from lmschool.errors import UserError
        raise UserError("the tokenizer has no end-of-turn token <|im_end|>, so chat prompts cannot be "
                        "rendered; evaluate a checkpoint whose tokenizer has the chat tokens")
    teacher = scorer if hasattr(scorer, "read_prompt") else None
    context = model.config.max_position_embeddings
    prompts = [tokenizer.render(r["prompt"], add_generation_prompt=True)[0] for r in rows]
    was_training = model.training
    model.eval()
    answers: dict[int, tuple[list[int], bool]] = {}
    usable = sorted((i for i, p in enumerate(prompts) if len(p) < context), key=lambda i: len(prompts[i]))
    for start in range(0, len(usable), batch_size):
        chunk = usable[start:start + batch_size]
        room = context - max(len(prompts[i]) for i in chunk)
        out = generate(model, [prompts[i] for i in chunk], max_new_tokens=min(max_new_tokens, room),
                       temperature=temperature, stop_ids=tokenizer.stop_ids,
                       pad_id=tokenizer.pad_id if tokenizer.pad_id is not None else 0, seed=seed + start)
        for i, tokens in zip(chunk, out.tokens):
            answers[i] = (tokens, bool(tokens) and tokens[-1] == tokenizer.im_end_id)
    model.train(was_training)

    done = sorted(answers)
    responses = {i: tokenizer.decode(answers[i][0], skip_special=True).strip() for i in done}
    if teacher is not None:
        scores = {i: teacher.score(rows[i]["prompt"], responses[i]) for i in done}
        totals = {i: s.total for i, s in scores.items()}
        parts = {i: s.parts for i, s in scores.items()}
    else:
        values = scorer([rows[i]["prompt"] for i in done], [responses[i] for i in done])
        if len(values) != len(done):
            from lmschool.errors import UserError
            raise UserError(f"the scorer returned {len(values)} scores for {len(done)} answers")
        totals, parts = {i: float(v) for i, v in zip(done, values)}, {}

    def category(i: int) -> str:
        if rows[i].get("category"):
            return str(rows[i]["category"])
        return teacher.read_prompt(rows[i]["prompt"]).category if teacher is not None else "all"

    categories = {i: category(i) for i in done}
    name = "teacher_score" if teacher is not None else "score"
    by_cat: dict[str, list[int]] = {}
    for i in done:
        by_cat.setdefault(categories[i], []).append(i)
    summary = {
        "eval_rows": len(done),
        "eval_skipped_too_long": len(rows) - len(done),
        name: _mean(totals[i] for i in done),
        f"{name}_by_category": {c: _mean(totals[i] for i in idx) for c, idx in sorted(by_cat.items())},
        "end_of_turn_rate": _mean(float(answers[i][1]) for i in done),
        "answer_tokens_mean": _mean(len(answers[i][0]) for i in done),
    }
    if parts:
        right = {i: float(parts[i]["correctness"] == 1.0) for i in done}
        facts = [i for i in done if categories[i].startswith("fact_")]
        summary.update({
            "correct": _mean(right[i] for i in done),
            "correct_by_category": {c: _mean(right[i] for i in idx) for c, idx in sorted(by_cat.items())},
            "fact_correct": _mean(right[i] for i in facts),
            "correct_train_pupils": _mean(right[i] for i in facts if rows[i].get("heldout") is False),
            "correct_heldout_pupils": _mean(right[i] for i in facts if rows[i].get("heldout") is True),
            "correct_arithmetic": _mean(right[i] for i in done if categories[i] == "arithmetic"),
            "refusal_correct": _mean(right[i] for i in done if categories[i] == "refuse"),
            "teacher_parts": {p: _mean(parts[i][p] for i in done) for p in next(iter(parts.values()))},
        })
    records = []
    for i, row in enumerate(rows):
        record = {"prompt": row["prompt"], "category": categories.get(i, row.get("category")),
                  "heldout": row.get("heldout")}
        if i in answers:
            record.update(response=responses[i], score=totals[i], parts=parts.get(i),
                          end_of_turn=answers[i][1], tokens=len(answers[i][0]))
        else:
            record.update(response=None, skipped=f"the prompt is {len(prompts[i])} tokens, not less than "
                                                  f"the context of {context}")
        record.update({k: row[k] for k in ("expected", "reference", "pupil") if k in row})
        records.append(record)
    return summary, records


# ---- a policy against its reference: win rate and KL (DPO, PPO) ------------------------------------
#
# After learning from feedback the question is not only "how good are the answers" but "better than
# the SFT model's?" and "how far did the policy move from it?". The win rate judges, prompt by
# prompt, the policy's greedy answer against the reference's with the same scorer (ties count half,
# as in AlpacaEval). The KL is the mean sequence log-ratio log pi(y|x) - log pi_ref(y|x) over answers
# y sampled from the policy at temperature 1: an unbiased estimate of KL(pi || pi_ref) per prompt,
# the quantity the RLHF objective bounds (Ouyang et al. 2022; Gao et al. 2023 plot reward against
# its square root).

def _judge(scorer, prompts: list, responses: list[str]) -> tuple[list[float], list[dict | None]]:
    """(totals, parts) of each answer, by a Teacher (with rubric parts) or a scorer function."""
    if hasattr(scorer, "read_prompt"):
        scores = [scorer.score(p, r) for p, r in zip(prompts, responses)]
        return [s.total for s in scores], [s.parts for s in scores]
    values = scorer(prompts, responses) if prompts else []
    if len(values) != len(prompts):
        from lmschool.errors import UserError
        raise UserError(f"the scorer returned {len(values)} scores for {len(prompts)} answers")
    return [float(v) for v in values], [None] * len(prompts)


@torch.no_grad()
def sampled_logratios(policy, reference, tokenizer, prompts: list[list[int]], *, max_new_tokens: int,
                      batch_size: int, samples: int = 1, seed: int = 0) -> tuple[list[float], list[int]]:
    """Sample `samples` answers per prompt (token ids) from `policy` at temperature 1 and return,
    per answer (prompt-major order), log pi(y|x) - log pi_ref(y|x) in nats and its token count.

    The log-probs are recomputed by one teacher-forced forward of each model in float32 (autocast
    off): a difference of two sums over every token would otherwise carry bf16 rounding."""
    from lmschool.data.preference import collate_rows
    from lmschool.generate import generate
    from lmschool.losses.preference import sequence_logprobs

    device = next(policy.parameters()).device
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    context = policy.config.max_position_embeddings
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    rows: dict[tuple[int, int], tuple[list[int], int]] = {}
    for k in range(samples):
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            room = context - max(len(prompts[i]) for i in chunk)
            out = generate(policy, [prompts[i] for i in chunk], max_new_tokens=min(max_new_tokens, room),
                           temperature=1.0, stop_ids=tokenizer.stop_ids, pad_id=pad_id,
                           seed=seed + 7919 * k + start)
            for i, tokens in zip(chunk, out.tokens):
                rows[(i, k)] = (list(prompts[i]) + tokens, len(prompts[i]))
    keys = sorted(rows, key=lambda key: len(rows[key][0]))
    logratio: dict[tuple[int, int], float] = {}
    was = policy.training, reference.training
    policy.eval(), reference.eval()
    with torch.autocast(device.type, enabled=False):
        for start in range(0, len(keys), batch_size):
            chunk = keys[start:start + batch_size]
            batch = collate_rows([rows[key] for key in chunk], pad_id)
            x, y = batch["input_ids"].to(device), batch["labels"].to(device)            # (B, T)
            diff = sequence_logprobs(policy(x), y) - sequence_logprobs(reference(x), y)  # (B,)
            logratio.update(zip(chunk, diff.tolist()))
    policy.train(was[0]), reference.train(was[1])
    ordered = sorted(rows)
    return [logratio[key] for key in ordered], [len(rows[key][0]) - rows[key][1] for key in ordered]


@torch.no_grad()
def evaluate_policy(policy, reference, tokenizer, rows: list[dict], teacher, *, reference_records=None,
                    max_new_tokens: int = 128, batch_size: int = 32, kl_samples: int = 1, seed: int = 0
                    ) -> tuple[dict, list[dict]]:
    """Judge a trained policy on eval rows, against its reference (the SFT model). Returns (summary,
    records).

    The policy's greedy answers are judged as `evaluate_generations` does (its summary keys are
    all kept), and compared prompt by prompt with the reference's greedy answers, both judged by
    `teacher` (a Teacher or a (prompts, responses) -> [float] scorer). `reference_records`: the
    records `evaluate_generations` wrote for the reference on the same rows in the same order (the
    SFT run's eval_answers.jsonl), so the reference is not asked again; their answers are judged
    afresh. None: the reference answers here. Added to the summary:

      win_rate_vs_sft        mean over prompts of 1 (policy's score higher), 0.5 (equal), 0 (lower)
      kl_from_sft            mean over answers sampled from the policy at temperature 1
                             (kl_samples per prompt) of log pi(y|x) - log pi_ref(y|x), nats/sequence
      kl_from_sft_per_token  the same sum over all answers divided by their tokens (a Monte Carlo
                             estimate: near 0 it can come out slightly negative)
      sft_teacher_score (sft_score for another scorer), sft_teacher_score_by_category,
      sft_correct, sft_fact_correct, sft_refusal_correct: the reference's figures, judged here

    records: those of evaluate_generations, plus reference_response, reference_score, win and
    kl (the prompt's mean sampled log-ratio)."""
    from lmschool.errors import UserError

    summary, records = evaluate_generations(policy, tokenizer, rows, teacher, max_new_tokens=max_new_tokens,
                                            batch_size=batch_size, temperature=0.0, seed=seed)
    if reference_records is None:
        _, reference_records = evaluate_generations(reference, tokenizer, rows, teacher,
                                                    max_new_tokens=max_new_tokens, batch_size=batch_size,
                                                    temperature=0.0, seed=seed)
    if len(reference_records) != len(rows):
        raise UserError(f"the reference answers hold {len(reference_records)} records for {len(rows)} eval "
                        "rows; they must answer the same eval file, row for row")
    for i, (row, ref) in enumerate(zip(rows, reference_records)):
        if ref.get("prompt") != row["prompt"]:
            raise UserError(f"reference answer {i + 1} is to another prompt than eval row {row.get('where', i + 1)}; "
                            "the reference answers must come from the same eval file, in its order")

    # the reference's answers, judged by the same scorer
    judged = [i for i, ref in enumerate(reference_records) if isinstance(ref.get("response"), str)]
    ref_totals, ref_parts = _judge(teacher, [rows[i]["prompt"] for i in judged],
                                   [reference_records[i]["response"] for i in judged])
    ref_total, ref_part = dict(zip(judged, ref_totals)), dict(zip(judged, ref_parts))
    wins = {}
    for i, record in enumerate(records):
        if record.get("response") is None or i not in ref_total:
            continue
        gap = record["score"] - ref_total[i]
        wins[i] = 1.0 if gap > 1e-9 else 0.0 if gap < -1e-9 else 0.5
        record.update(reference_response=reference_records[i]["response"], reference_score=ref_total[i],
                      win=wins[i])

    name = "teacher_score" if hasattr(teacher, "read_prompt") else "score"
    by_cat: dict[str, list[int]] = {}
    for i in judged:
        by_cat.setdefault(str(records[i]["category"]), []).append(i)
    summary.update({
        "win_rate_vs_sft": _mean(wins.values()),
        "wins": sum(1 for w in wins.values() if w == 1.0),
        "ties": sum(1 for w in wins.values() if w == 0.5),
        "losses": sum(1 for w in wins.values() if w == 0.0),
        f"sft_{name}": _mean(ref_total.values()),
        f"sft_{name}_by_category": {c: _mean(ref_total[i] for i in idx) for c, idx in sorted(by_cat.items())},
    })
    if any(p is not None for p in ref_parts):
        right = {i: float(ref_part[i]["correctness"] == 1.0) for i in judged}
        summary.update({
            "sft_correct": _mean(right.values()),
            "sft_fact_correct": _mean(right[i] for i in judged if str(records[i]["category"]).startswith("fact_")),
            "sft_refusal_correct": _mean(right[i] for i in judged if records[i]["category"] == "refuse"),
        })

    # KL(pi || pi_ref) on the eval prompts, from sampled answers
    if kl_samples > 0:
        prompts = [tokenizer.render(r["prompt"], add_generation_prompt=True)[0] for r in rows]
        usable = [i for i, p in enumerate(prompts) if len(p) < policy.config.max_position_embeddings]
        logratios, lengths = sampled_logratios(policy, reference, tokenizer, [prompts[i] for i in usable],
                                               max_new_tokens=max_new_tokens, batch_size=batch_size,
                                               samples=kl_samples, seed=seed + 1)
        summary.update(kl_from_sft=_mean(logratios), kl_from_sft_per_token=sum(logratios) / max(sum(lengths), 1),
                       kl_samples=kl_samples)
        for n, i in enumerate(usable):
            records[i]["kl"] = _mean(logratios[n * kl_samples:(n + 1) * kl_samples])
    return summary, records
