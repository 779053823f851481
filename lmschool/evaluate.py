"""Evaluation measures shared by the stages: held-out loss and bits per byte; answers to held-out
prompts judged by a judge (lmschool.judges: the school world's teacher, a `module:function` or a
reward model; `evaluate_generations`, used by SFT, the later stages and `lmschool eval`); a
policy's win rate against its reference and its KL from it (`evaluate_policy`, DPO and PPO).

Bits per byte makes losses comparable across tokenizers: the total information the model needs
for the held-out text, in bits, divided by the text's UTF-8 size. End-of-document tokens are
left out of both sides (they are not text).
"""

from __future__ import annotations

import math

import torch

from lmschool.judges import as_judge
# stages/ppo.py imports these two from here until it imports lmschool.judges itself
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


# ---- generation-based evaluation: answers to held-out prompts, judged ------------------------------
#
# The model answers each prompt (greedy by default, batched, through `generate`); a judge
# (lmschool.judges) scores each answer. The default judge is the school world's teacher, whose
# rubric parts give the correctness figures; a `module:function` or a reward model can replace it
# (then only the mean score and the end-of-turn rate are reported). The stages (SFT, DPO, PPO) and
# `lmschool eval` all call `evaluate_generations`.

def _fields(rows: list[dict], idx: list[int]) -> dict[str, list]:
    """The eval rows' other columns (category, expected, a gold answer ...), per judged answer (a
    judge's **fields, judges.row_fields)."""
    from lmschool.judges import row_fields
    return row_fields([rows[i] for i in idx])


def _mean(values) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


CONDUCT_PARTS = ("politeness", "brevity", "safety", "form")
"""The rubric's parts other than correctness: how an answer behaves, whatever it knows."""


def conduct(judge, prompts: list, responses: list[str], parts: list[dict | None], categories: list[str],
            prefix: str = "") -> dict:
    """How a set of answers behaves, by a judge that names flaws (the school world's teacher); {} for
    another judge. Keys (each with `prefix`):

      flaw_rate           share of answers with any demonstrator flaw (Teacher.flaws)
      flaw_rates          {flaw: share of answers with it}
      hallucination_rate  share of the answers to honesty questions (category "unknown") that invent
                          an answer instead of saying they do not know; unknown_rows counts them
      behaviour_score     mean over answers of the rubric's parts other than correctness
      conduct_rows        how many answers these are over
    """
    named = judge.flaws(prompts, responses)
    if named is None or not responses:
        return {}
    from lmschool.world.teacher import FLAWS

    honesty = [i for i, c in enumerate(categories) if c == "unknown"]
    rubric = [p for p in parts if p is not None]
    out = {
        "flaw_rate": _mean(float(bool(f)) for f in named),
        "flaw_rates": {k: _mean(float(k in f) for f in named) for k in FLAWS},
        "hallucination_rate": _mean(float("invented" in named[i]) for i in honesty),
        "unknown_rows": len(honesty),
        "behaviour_score": _mean(sum(p[k] for k in CONDUCT_PARTS) / len(CONDUCT_PARTS) for p in rubric),
        "conduct_rows": len(responses),
    }
    return {prefix + k: v for k, v in out.items()}


def judge_demonstrations(judge, rows: list[dict]) -> dict:
    """The conduct of training answers themselves: each {"messages": [...]} row's last assistant turn
    judged against the messages before it. Keys: demonstration_behaviour_score,
    demonstration_flaw_share (and demonstration_flaw_rates), demonstration_rows; {} for a judge
    without flaws or no such rows."""
    if judge.flaws([], []) is None:
        return {}
    pairs = [(r["messages"][:-1], str(r["messages"][-1].get("content", ""))) for r in rows
             if isinstance(r.get("messages"), list) and r["messages"]
             and isinstance(r["messages"][-1], dict) and r["messages"][-1].get("role") == "assistant"]
    if not pairs:
        return {}
    prompts, responses = [p for p, _ in pairs], [a for _, a in pairs]
    _, parts = judge(prompts, responses)
    if any(p is None for p in parts):
        return {}
    found = conduct(judge, prompts, responses, parts, [judge.category(p) for p in prompts])
    if not found:
        return {}
    return {"demonstration_behaviour_score": found["behaviour_score"],
            "demonstration_flaw_share": found["flaw_rate"],
            "demonstration_flaw_rates": found["flaw_rates"],
            "demonstration_rows": len(pairs)}


@torch.no_grad()
def evaluate_generations(model, tokenizer, rows: list[dict], scorer, *, max_new_tokens: int = 128,
                         batch_size: int = 32, temperature: float = 0.0, seed: int = 0
                         ) -> tuple[dict, list[dict]]:
    """Answer every row's prompt and judge the answers. Returns (summary, records).

    rows: dicts with "prompt" (messages ending in a user turn; see data.prompts.read_prompts), optional
    "category" and "heldout". scorer: a judges.Judge (the teacher's rubric parts give the
    correctness figures), or a Teacher or (prompts, responses) -> list[float] function (judges.as_judge).

    summary, all fractions in [0, 1] (None where no row is of that kind):
      teacher_score (or score, for another scorer), and *_by_category: mean score;
      end_of_turn_rate: answers that ended with the end-of-turn token (not cut by max_new_tokens);
      with the teacher: correct (correctness part == 1) overall and by category, fact_correct,
      correct_train_pupils / correct_heldout_pupils (fact questions about pupils seen in SFT / only
      in the corpus), correct_arithmetic, refusal_correct (a refusal with a reason that fits the request, where one is due), and
      teacher_parts (mean of each rubric part); fact_rows, train_pupil_rows, heldout_pupil_rows,
      arithmetic_rows, refuse_rows: the number of answers each of those rates is over.
    records: one per row, in row order: prompt, category, heldout, response, score, parts,
      end_of_turn, tokens (and the row's expected / reference / pupil, if any).
    """
    end_of_turn = tokenizer.end_of_turn_id
    if end_of_turn is None:
        from lmschool.errors import UserError
        raise UserError("the tokenizer has no chat template with an end-of-turn token, so chat prompts cannot "
                        "be rendered; evaluate a checkpoint whose tokenizer has one")
    judge = as_judge(scorer)
    context = model.config.max_position_embeddings
    prompts = [tokenizer.render(r["prompt"], add_generation_prompt=True)[0] for r in rows]
    was_training = model.training
    model.eval()
    usable = [i for i, p in enumerate(prompts) if len(p) < context]
    outs = sample_responses(model, tokenizer, [prompts[i] for i in usable], samples=1, max_new_tokens=max_new_tokens,
                          batch_size=batch_size, seed=seed, temperature=temperature)
    answers = {i: (tokens, bool(tokens) and tokens[-1] == end_of_turn) for i, tokens in zip(usable, outs)}
    model.train(was_training)

    done = sorted(answers)
    responses = {i: tokenizer.decode(answers[i][0], skip_special=True).strip() for i in done}
    values, rubric = judge([rows[i]["prompt"] for i in done], [responses[i] for i in done], **_fields(rows, done))
    totals = dict(zip(done, values))
    parts = {i: p for i, p in zip(done, rubric) if p is not None}
    categories = {i: str(rows[i]["category"]) if rows[i].get("category") else judge.category(rows[i]["prompt"])
                  for i in done}
    name = judge.score_key
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
            # how many answers each rate is over (the report's confidence intervals)
            "fact_rows": len(facts),
            "train_pupil_rows": sum(rows[i].get("heldout") is False for i in facts),
            "heldout_pupil_rows": sum(rows[i].get("heldout") is True for i in facts),
            "arithmetic_rows": sum(categories[i] == "arithmetic" for i in done),
            "refuse_rows": sum(categories[i] == "refuse" for i in done),
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


def sampling_settings(model, *, seed: int, batch_size: int, max_new_tokens: int) -> dict:
    """What, besides the weights and the prompts, decides a model's sampled eval answers: the same
    settings give the same answers (`sample_responses`), so a later stage can read them instead of
    sampling again. The device type and autocast dtype are among them (they change the numbers)."""
    device = next(model.parameters()).device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    return {"seed": seed, "batch_size": batch_size, "max_new_tokens": max_new_tokens, "temperature": 1.0,
            "device": device, "autocast": None if dtype is None else str(dtype).removeprefix("torch.")}


@torch.no_grad()
def evaluate_sampled(model, tokenizer, rows: list[dict], judge, *, max_new_tokens: int = 128,
                     batch_size: int = 32, seed: int = 0) -> tuple[dict, dict[int, dict]]:
    """One answer per prompt sampled at temperature 1 (the distribution the feedback stages start
    from and the win rate compares), judged. Returns (summary, per_row): {score_key}_sampled and, for
    a judge that names flaws, the `conduct` figures ({} for no usable row); per row index, the fields
    an eval record keeps of it, sampled ([[answer, score]]) and sampled_with (`sampling_settings`):
    with the SFT model's records, `evaluate_policy` reads these answers instead of sampling them
    again. Uses seed + 1, as evaluate_policy's samples do."""
    judge = as_judge(judge)
    prompts = [tokenizer.render(r["prompt"], add_generation_prompt=True)[0] for r in rows]
    usable = [i for i, p in enumerate(prompts) if len(p) < model.config.max_position_embeddings]
    if not usable:
        return {}, {}
    was_training = model.training
    model.eval()
    outs = sample_responses(model, tokenizer, [prompts[i] for i in usable], samples=1,
                            max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed + 1)
    model.train(was_training)
    texts = [tokenizer.decode(a, skip_special=True).strip() for a in outs]
    questions = [rows[i]["prompt"] for i in usable]
    scores, parts = judge(questions, texts, **_fields(rows, usable))
    categories = [str(rows[i].get("category") or judge.category(rows[i]["prompt"])) for i in usable]
    settings = sampling_settings(model, seed=seed + 1, batch_size=batch_size, max_new_tokens=max_new_tokens)
    per_row = {i: {"sampled": [[t, s]], "sampled_with": settings} for i, t, s in zip(usable, texts, scores)}
    return {f"{judge.score_key}_sampled": _mean(scores),
            **conduct(judge, questions, texts, parts, categories)}, per_row


# ---- a policy against its reference: win rate and KL (DPO, PPO) ------------------------------------
#
# After learning from feedback the question is not only "how good are the answers" but "better than
# the SFT model's?" and "how far did the policy move from it?". The win rate judges, prompt by
# prompt, the policy's answer against the reference's with the same scorer (ties count half, as in
# AlpacaEval). It is taken on answers sampled at temperature 1, the distribution that RLHF
# optimises, as the DPO paper compares sampled answers (Rafailov et al. 2023, Fig. 2-3); the greedy
# comparison is reported beside it. Where the SFT model's greedy answers mostly score full marks
# already, greedy answers can only tie there: on the school world 77% of them do, which caps the
# greedy win rate near 61%. The KL is the mean sequence log-ratio log pi(y|x) - log pi_ref(y|x)
# over the policy's samples: an unbiased estimate of KL(pi || pi_ref) per prompt, the quantity the
# RLHF objective bounds (Ouyang et al. 2022; Gao et al. 2023 plot reward against its square root).

@torch.no_grad()
def sample_responses(model, tokenizer, prompts: list[list[int]], *, samples: int, max_new_tokens: int,
                   batch_size: int, seed: int = 0, temperature: float = 1.0, first: int = 0) -> list[list[int]]:
    """`samples` answers (token ids, up to and including a stop token) per prompt from `model` at
    `temperature`, in prompt-major order: answer k of prompt i is at i * samples + k. Prompts are
    batched by length; the seed of each batch depends only on `seed`, the sample index and the
    batch's position, so two models asked with the same seed share their random numbers. `first`:
    leave out answers 0 .. first - 1 (known already); the others are as they would be with them."""
    from lmschool.generate import generate

    pad_id = tokenizer.fill_id
    context = model.config.max_position_embeddings
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers: dict[tuple[int, int], list[int]] = {}
    for k in range(first, samples):
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            room = context - max(len(prompts[i]) for i in chunk)
            out = generate(model, [prompts[i] for i in chunk], max_new_tokens=min(max_new_tokens, room),
                           temperature=temperature, stop_ids=tokenizer.stop_ids, pad_id=pad_id,
                           seed=seed + 7919 * k + start)
            answers.update(((i, k), tokens) for i, tokens in zip(chunk, out.tokens))
    return [answers[key] for key in sorted(answers)]


@torch.no_grad()
def sequence_logratios(policy, reference, pad_id: int, rows: list[tuple[list[int], int]], *,
                       batch_size: int) -> list[float]:
    """log pi(y|x) - log pi_ref(y|x) in nats of each (prompt + answer ids, prompt length) row.

    One teacher-forced forward of each model in float32 (autocast off): a difference of two sums
    over every token would otherwise carry bf16 rounding."""
    from lmschool.data.preference import collate_rows
    from lmschool.losses.preference import sequence_logprobs

    device = next(policy.parameters()).device
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
    logratio: dict[int, float] = {}
    was = policy.training, reference.training
    policy.eval(), reference.eval()
    with torch.autocast(device.type, enabled=False):
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            batch = collate_rows([rows[i] for i in chunk], pad_id)
            x, y = batch["input_ids"].to(device), batch["labels"].to(device)            # (B, T)
            diff = sequence_logprobs(policy(x), y) - sequence_logprobs(reference(x), y)  # (B,)
            logratio.update(zip(chunk, diff.tolist()))
    policy.train(was[0]), reference.train(was[1])
    return [logratio[i] for i in range(len(rows))]


def _wins(scores: list[float], reference: list[float]) -> list[float]:
    """1 where a score beats the reference's, 0.5 where equal (within 1e-9), 0 where lower."""
    return [1.0 if a - b > 1e-9 else 0.0 if a - b < -1e-9 else 0.5 for a, b in zip(scores, reference)]


@torch.no_grad()
def evaluate_policy(policy, reference, tokenizer, rows: list[dict], judge, *, reference_records=None,
                    max_new_tokens: int = 128, batch_size: int = 32, kl_samples: int = 1, seed: int = 0
                    ) -> tuple[dict, list[dict]]:
    """Judge a trained policy on eval rows, against its reference (the SFT model). Returns (summary,
    records).

    The policy's greedy answers are judged as `evaluate_generations` does (its summary keys are
    all kept) and compared prompt by prompt with the reference's greedy answers. `reference_records`:
    the records `evaluate_generations` wrote for the reference on the same rows in the same order
    (the SFT run's eval_answers.jsonl), so the reference is not asked again; their answers are
    judged afresh. None: the reference answers here. Then `kl_samples` answers per prompt are
    sampled at temperature 1 from the policy and from the reference (with the same random numbers:
    where the two models agree, so do their samples) and judged; the reference's first answer per
    prompt is read from `reference_records` where they hold it, sampled with these settings
    (`evaluate_sampled`'s per-row fields: the SFT stage's records). `judge`: as evaluate_generations'
    scorer. Added to the summary:

      win_rate_vs_sft        sampled answers, the policy's k-th against the reference's k-th on each
                             prompt: mean of 1 (policy's score higher), 0.5 (equal), 0 (lower), as
                             the DPO paper compares sampled answers; wins, ties, losses count them.
                             Absent when kl_samples is 0
      win_rate_vs_sft_greedy the same for the greedy answers (greedy_wins, greedy_ties,
                             greedy_losses). Where most of the reference's greedy answers already
                             score full marks, ties bound it: see the report's note
      teacher_score_sampled, sft_teacher_score_sampled   mean score of the sampled answers
      kl_from_sft            mean over the policy's sampled answers of log pi(y|x) - log pi_ref(y|x),
                             nats/sequence: an unbiased estimate of KL(pi || pi_ref)
      kl_from_sft_per_token  the same sum over all answers divided by their tokens (a Monte Carlo
                             estimate: near 0 it can come out slightly negative)
      reference_first_samples "read" (from reference_records) or "sampled" (here)
      sft_teacher_score (sft_score for another scorer), sft_teacher_score_by_category,
      sft_correct, sft_fact_correct, sft_refusal_correct: the reference's greedy figures, judged here

    ("teacher_score" reads "score" throughout for a scorer that is not a Teacher.) records: those
    of evaluate_generations, plus reference_response, reference_score, win (greedy), and with
    samples: kl (the prompt's mean log-ratio), sampled and reference_sampled ([answer, score] each)."""
    from lmschool.errors import UserError

    judge = as_judge(judge)
    summary, records = evaluate_generations(policy, tokenizer, rows, judge, max_new_tokens=max_new_tokens,
                                            batch_size=batch_size, temperature=0.0, seed=seed)
    if reference_records is None:
        _, reference_records = evaluate_generations(reference, tokenizer, rows, judge,
                                                    max_new_tokens=max_new_tokens, batch_size=batch_size,
                                                    temperature=0.0, seed=seed)
    if len(reference_records) != len(rows):
        raise UserError(f"the reference answers hold {len(reference_records)} records for {len(rows)} eval "
                        "rows; they must answer the same eval file, row for row")
    for i, (row, ref) in enumerate(zip(rows, reference_records)):
        if ref.get("prompt") != row["prompt"]:
            raise UserError(f"reference answer {i + 1} is to another prompt than eval row {row.get('where', i + 1)}; "
                            "the reference answers must come from the same eval file, in its order")

    # the reference's greedy answers, judged by the same scorer
    judged = [i for i, ref in enumerate(reference_records)
              if isinstance(ref.get("response"), str) and records[i].get("response") is not None]
    ref_totals, ref_parts = judge([rows[i]["prompt"] for i in judged],
                                  [reference_records[i]["response"] for i in judged], **_fields(rows, judged))
    ref_total, ref_part = dict(zip(judged, ref_totals)), dict(zip(judged, ref_parts))
    greedy = dict(zip(judged, _wins([records[i]["score"] for i in judged], ref_totals)))
    for i in judged:
        records[i].update(reference_response=reference_records[i]["response"], reference_score=ref_total[i],
                          win=greedy[i])

    name = judge.score_key
    by_cat: dict[str, list[int]] = {}
    for i in judged:
        by_cat.setdefault(str(records[i]["category"]), []).append(i)
    summary.update({
        "win_rate_vs_sft_greedy": _mean(greedy.values()),
        **_tally(greedy.values(), "greedy_"),
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
    if kl_samples <= 0:
        return summary, records

    # sampled answers of both models: the sampled win rate and KL(pi || pi_ref)
    prompts = [tokenizer.render(r["prompt"], add_generation_prompt=True)[0] for r in rows]
    usable = [i for i in judged if len(prompts[i]) < policy.config.max_position_embeddings]
    asked = [prompts[i] for i in usable]
    n = kl_samples
    mine = sample_responses(policy, tokenizer, asked, samples=n, max_new_tokens=max_new_tokens,
                          batch_size=batch_size, seed=seed + 1)
    # the reference's first answer per prompt: read from its records where they were sampled as
    # these would be (the SFT stage's, same settings and prompts), else sampled here
    settings = sampling_settings(reference, seed=seed + 1, batch_size=batch_size, max_new_tokens=max_new_tokens)
    known = [i for i, r in enumerate(reference_records) if r.get("sampled")]
    read = known == usable and all(reference_records[i].get("sampled_with") == settings for i in usable)
    theirs = sample_responses(reference, tokenizer, asked, samples=n, max_new_tokens=max_new_tokens,
                            batch_size=batch_size, seed=seed + 1, first=1 if read else 0)
    theirs = [tokenizer.decode(a, skip_special=True).strip() for a in theirs]
    if read:
        rest = n - 1
        theirs = [text for p, i in enumerate(usable)
                  for text in [reference_records[i]["sampled"][0][0], *theirs[p * rest:(p + 1) * rest]]]
    pad_id = tokenizer.fill_id
    logratios = sequence_logratios(policy, reference, pad_id,
                                   [(list(asked[m // n]) + a, len(asked[m // n])) for m, a in enumerate(mine)],
                                   batch_size=batch_size)
    questions = [rows[usable[m // n]]["prompt"] for m in range(len(mine))]
    texts = ([tokenizer.decode(a, skip_special=True).strip() for a in mine], theirs)
    fields = _fields(rows, [usable[m // n] for m in range(len(mine))])
    judged_samples = judge(questions, texts[0], **fields), judge(questions, texts[1], **fields)
    scores = judged_samples[0][0], judged_samples[1][0]
    sampled = _wins(*scores)
    lengths = [len(a) for a in mine]
    categories = [str(rows[usable[m // n]].get("category") or judge.category(questions[m])) for m in range(len(mine))]
    for prefix, text, (_, rubric) in zip(("", "sft_"), texts, judged_samples):
        summary.update(conduct(judge, questions, text, rubric, categories, prefix))
    summary.update({
        "win_rate_vs_sft": _mean(sampled), **_tally(sampled),
        f"{name}_sampled": _mean(scores[0]), f"sft_{name}_sampled": _mean(scores[1]),
        "kl_from_sft": _mean(logratios), "kl_from_sft_per_token": sum(logratios) / max(sum(lengths), 1),
        "kl_samples": n, "sampling_temperature": 1.0,
        "reference_first_samples": "read" if read else "sampled",
    })
    for m, i in enumerate(usable):
        part = slice(m * n, (m + 1) * n)
        records[i].update(kl=_mean(logratios[part]),
                          sampled=[[t, s] for t, s in zip(texts[0][part], scores[0][part])],
                          reference_sampled=[[t, s] for t, s in zip(texts[1][part], scores[1][part])])
    return summary, records


def _tally(wins, prefix: str = "") -> dict[str, int]:
    """Counts of wins (1), ties (0.5) and losses (0)."""
    wins = list(wins)
    return {f"{prefix}wins": wins.count(1.0), f"{prefix}ties": wins.count(0.5), f"{prefix}losses": wins.count(0.0)}


# ---- the SFT model's answers, written once by its own run ------------------------------------------

def run_file(checkpoint, name: str):
    """RUN/name beside a checkpoint argument (a run directory, or its model/ subdirectory), or None."""
    from pathlib import Path
    given = Path(checkpoint)
    for run in (given, given.parent) if given.name == "model" else (given,):
        if (run / name).is_file():
            return run / name
    return None


def reference_answers(path, rows: list[dict], *, explicit: bool, stage: str) -> list[dict] | None:
    """The eval_answers.jsonl records of `path` if they answer `rows` prompt for prompt (so the
    reference model need not answer again); else an error when the user named the file
    (`explicit`), or None with a note (found by itself: the reference answers afresh)."""
    from lmschool.data.jsonl import read_jsonl
    from lmschool.errors import UserError

    records = [row for _, row in read_jsonl(path, "expected eval_answers.jsonl records")]
    if len(records) == len(rows) and all(r.get("prompt") == row["prompt"] for r, row in zip(records, rows)):
        return records
    if explicit:
        raise UserError(f"--reference-answers {path}: its {len(records)} records do not answer the "
                        f"{len(rows)} prompts of --eval in order; give the answers to the same eval file")
    print(f"{stage}: {path} answers other prompts than --eval; the reference model answers afresh")
    return None
