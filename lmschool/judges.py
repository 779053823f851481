"""Judges: whatever scores an answer to a prompt, behind one interface.

    judge(prompts, responses, **fields) -> (scores, parts)

prompts are message lists (or plain strings), responses are assistant texts; scores is one float
per response; parts is one rubric dict per response (`{"correctness": 1.0, ...}`), or None where
the judge has no rubric. `fields` are per-response lists of the data's other columns (`row_fields`:
every key of a prompts row but "prompt" and "where", e.g. `category=[...]`, a gold `answer=[...]`),
as TRL passes dataset columns to its reward functions; the teacher and a reward model read all they
need from the prompt, a user's function gets the columns it names (all of them with **kwargs).
Three versions, one per source of judgement in the course (nanochat's `Task.reward` is the model):

- `TeacherJudge`: the school world's gold teacher (lmschool.world.teacher), its rubric as parts;
- `FunctionJudge`: a user's `module:function` taking (prompts, responses, **columns) -> [float],
  checked for one finite number per response; TRL's convention works too: a function with a
  `completions` parameter is called by keyword, `function(prompts=..., completions=..., **columns)`;
- `RewardModelJudge`: a reward model from `lmschool reward`, its score at the answer's closing
  <|im_end|> minus the checkpoint's reward_bias. PPO scores its rollouts with `rollout_scores`,
  which reads the token ids it already has (no decode and re-encode) for a reward model.

`make_judge` turns the command line (`--scorer teacher|module:function`, `--reward RM`) into one;
`world_file` / `school_teacher` find "the school world beside these files" for every caller;
`as_judge` accepts a Teacher or a plain function where a library user passes one.
"""

from __future__ import annotations

import importlib
import inspect
import math
from itertools import groupby
from pathlib import Path

import torch

from lmschool.errors import UserError


class Judge:
    """The interface: `judge(prompts, responses, **fields) -> (scores, parts)` (see the module)."""

    name: str = "judge"
    score_key: str = "score"
    """The name of its mean score in evaluation summaries ("teacher_score" for the teacher)."""

    def __call__(self, prompts: list, responses: list[str], **fields) -> tuple[list[float], list[dict | None]]:
        raise NotImplementedError

    def category(self, prompt) -> str:
        """The category of a prompt that carries none, for per-category figures ("all": unknown)."""
        return "all"

    def flaws(self, prompts: list, responses: list[str]) -> list[list[str]] | None:
        """The named flaws of each answer (the school world's demonstrator habits), or None for a
        judge that names none."""
        return None

    def rollout_scores(self, prompts: list, responses: list[str], input_ids: torch.Tensor,
                       last_index: torch.Tensor, batch_size: int, **fields) -> torch.Tensor:
        """Scores (N,) of N rollouts given both as texts and as token ids: input_ids (N, L) prompt +
        response right-padded, last_index (N,) each row's last token. This judges the texts; a
        reward model reads the ids instead."""
        return torch.tensor(self(prompts, responses, **fields)[0], device=input_ids.device)


class TeacherJudge(Judge):
    """The school world's teacher: scores are rubric totals, parts the rubric (Teacher.score)."""

    score_key = "teacher_score"

    def __init__(self, teacher, name: str = "teacher"):
        self.teacher, self.name = teacher, name

    def __call__(self, prompts, responses, **fields):
        # consecutive answers to one prompt object (label's K samples of it) share one reading of it
        scores = []
        for _, run in groupby(zip(prompts, responses), key=lambda pair: id(pair[0])):
            run = list(run)
            scores += self.teacher.scores(run[0][0], [response for _, response in run])
        return [s.total for s in scores], [s.parts for s in scores]

    def category(self, prompt) -> str:
        return self.teacher.read_prompt(prompt).category

    def flaws(self, prompts, responses):
        return [self.teacher.flaws(p, r) for p, r in zip(prompts, responses)]


def row_fields(rows: list[dict]) -> dict[str, list]:
    """The columns of data rows other than the prompt, one list per column with one value per row
    (None where a row lacks it): what a judge gets as **fields."""
    keys = dict.fromkeys(k for row in rows for k in row if k not in ("prompt", "where"))
    return {k: [row.get(k) for row in rows] for k in keys}


def _columns_taken(function) -> tuple[set[str] | None, set[str], bool]:
    """(the column names `function` takes beyond the first two parameters, None for **kwargs: all;
    those it requires; whether it takes TRL's `completions` by keyword)."""
    try:
        parameters = list(inspect.signature(function).parameters.values())
    except (TypeError, ValueError):   # no signature to read (some built-ins)
        return set(), set(), False
    by_keyword = any(p.name == "completions" for p in parameters)
    rest = [p for p in parameters if p.name not in ("prompts", "completions")] if by_keyword else parameters[2:]
    plain = [p for p in rest if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    required = {p.name for p in plain if p.default is p.empty}
    takes_all = any(p.kind is p.VAR_KEYWORD for p in rest)
    return (None if takes_all else {p.name for p in plain}), required, by_keyword


class FunctionJudge(Judge):
    """A `module:function` (prompts, responses, **columns) -> [float]: one finite number per
    response. It gets the data columns it names (all with **kwargs); one it requires that the data
    lacks is a UserError naming it."""

    def __init__(self, function, name: str):
        self.function, self.name = function, name
        self.takes, self.requires, self.by_keyword = _columns_taken(function)

    def __call__(self, prompts, responses, **fields):
        if not responses:
            return [], []
        missing = sorted(self.requires - set(fields))
        if missing:
            raise UserError(f"--scorer {self.name} takes the column(s) {', '.join(missing)}, which the data "
                            f"does not have (it has: {', '.join(fields) or 'only prompts'}); add the column or "
                            "give the parameter a default")
        columns = fields if self.takes is None else {k: v for k, v in fields.items() if k in self.takes}
        try:
            values = (self.function(prompts=prompts, completions=responses, **columns) if self.by_keyword
                      else self.function(prompts, responses, **columns))
        except Exception as e:   # the user's function failed: one line naming it, as for its answers
            raise UserError(f"--scorer {self.name} raised {type(e).__name__}: {' '.join(str(e).split())[:120]}; "
                            "it is called as function(prompts, responses) with the columns it names and must return one "
                            "number per response") from None
        try:
            values = [float(v) for v in values]
        except (TypeError, ValueError):
            raise UserError(f"--scorer {self.name} must return one number per response; it returned "
                            f"{str(values)[:80]}") from None
        if len(values) != len(responses):
            raise UserError(f"--scorer {self.name} returned {len(values)} scores for {len(responses)} responses")
        bad = [v for v in values if not math.isfinite(v)]
        if bad:
            raise UserError(f"--scorer {self.name} returned a non-finite score ({bad[0]}); scores must be numbers")
        return values, [None] * len(values)


def reward_bias(path: str | Path) -> float:
    """The bias stored with a reward checkpoint (0 if it has none)."""
    from lmschool.checkpoint import model_extra

    return float(model_extra(path).get("reward_bias", 0.0) or 0.0)


class RewardModelJudge(Judge):
    """A frozen reward model: score at the answer's last token (its <|im_end|>) minus reward_bias.

    path: the reward run or model directory. tokenizer: the policy's, which must be the reward
    model's own (it reads the policy's token ids); None = the reward model's. `where` names the
    argument in errors; bias None = the checkpoint's reward_bias (0.0 for raw scores); batch_size:
    rows per forward on the text path."""

    def __init__(self, path, tokenizer=None, device="cpu", *, where: str = "--reward",
                 policy_name: str = "--init", bias: float | None = None, batch_size: int = 64):
        from lmschool.checkpoint import check_kind, load_model, resolve
        from lmschool.tokenizer import Tokenizer, check_same_tokenizer

        path = resolve(path)
        check_kind(path, "reward", where)
        own = Tokenizer.load(path)
        if tokenizer is None:
            tokenizer = own
            if own.end_of_turn_id is None:
                raise UserError(f"{where} {path}: its tokenizer has no chat template with an end-of-turn token, "
                                "so answers cannot be scored; use a reward model trained from a chat checkpoint")
        else:
            check_same_tokenizer(own, tokenizer, f"{where} {path}", policy_name)
        # eval(): dropout off, as everywhere a frozen model scores
        self.model = load_model(path, head="score").to(device).eval().requires_grad_(False)
        self.bias = reward_bias(path) if bias is None else float(bias)
        self.tokenizer, self.name, self.batch_size = tokenizer, str(path), batch_size

    @torch.no_grad()
    def score_ids(self, input_ids: torch.Tensor, last_index: torch.Tensor, batch_size: int) -> torch.Tensor:
        """Rewards (N,) of right-padded rows: input_ids (N, L), last_index (N,) each row's final
        token; `batch_size` rows of alike length per forward, each cut to its longest row."""
        from lmschool.losses.reward import rewards_at
        from lmschool.rollout import by_length, unsort

        chunks, order = by_length(last_index, batch_size)
        out = []
        for rows in chunks:
            rows = rows.to(input_ids.device)
            ends = last_index[rows]                                                        # (n,)
            scores = self.model(input_ids[rows, :int(ends.max()) + 1])                     # (n, L')
            out.append(rewards_at(scores, ends) - self.bias)                               # (n,)
        return unsort(torch.cat(out), order)

    def rollout_scores(self, prompts, responses, input_ids, last_index, batch_size, **fields):
        return self.score_ids(input_ids, last_index, batch_size)

    def __call__(self, prompts, responses, **fields):
        """The prompt and the answer through its end-of-turn token (Tokenizer.encode_response, as the
        reward model was trained), cut from the left to the context, right-padded, scored at the
        end of turn."""
        if not responses:
            return [], []
        tok = self.tokenizer
        seqs = [tok.encode_response(p, t)[0] for p, t in zip(prompts, responses)]
        context = self.model.config.max_position_embeddings
        seqs = [s[-context:] for s in seqs]
        device = next(self.model.parameters()).device
        width = max(len(s) for s in seqs)
        input_ids = torch.tensor([s + [tok.fill_id] * (width - len(s)) for s in seqs], device=device)  # (N, L)
        last_index = torch.tensor([len(s) - 1 for s in seqs], device=device)                         # (N,)
        scores = self.score_ids(input_ids, last_index, self.batch_size).tolist()
        return scores, [None] * len(scores)


# ---- the school world beside the data, and the command line ------------------------------------

def world_file(*paths) -> Path | None:
    """The world.json beside the first of `paths` (files; None ones skipped) that has one."""
    for p in paths:
        if p is not None and (Path(p).parent / "world.json").is_file():
            return Path(p).parent / "world.json"
    return None


def school_teacher(*paths):
    """The school world's Teacher: of the world.json beside one of `paths` if there is one, else
    lmschool.world.teacher's default world (LMSCHOOL_WORLD, or the built-in default world)."""
    from lmschool.world.teacher import Teacher, default_teacher

    found = world_file(*paths)
    if found is None:
        return default_teacher()
    try:
        return Teacher.from_file(found)
    except UserError as e:   # a world without its keys is named without its file: name it
        if str(found) in str(e):
            raise
        raise UserError(f"{found}: {e}") from None


def load_function(spec: str):
    """The function named by "module:function", e.g. "lmschool.world.teacher:reward"."""
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
    try:   # before any work: a function that cannot take (prompts, responses) fails only when called
        _, required, by_keyword = _columns_taken(function)
        columns = dict.fromkeys(required)
        if by_keyword:
            inspect.signature(function).bind(prompts=[], completions=[], **columns)
        else:
            inspect.signature(function).bind([], [], **columns)
    except TypeError:
        shown = str(inspect.signature(function))
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        raise UserError(f"--scorer {spec} takes {shown}; it must take "
                        "(prompts, responses) and return one number per response") from None
    except ValueError:   # no signature to read (some built-ins): it is called as it is
        pass
    return function


# Two answers a --scorer is tried on before any work (a judge that returns one score, words, NaN or
# raises is found before the sampling and before --out is opened, not after).
PROBE_ANSWERS = ("I don't know.", "Yes, that is right.")


def make_judge(scorer: str | None = None, reward=None, *, beside=(), tokenizer=None, device="cpu",
               batch_size: int = 64, policy_name: str = "--init", probe=None) -> Judge:
    """The judge a command line names: --reward RM (a RewardModelJudge checked against the policy's
    `tokenizer`, which `policy_name` names in errors; `batch_size` rows per forward), else --scorer
    module:function, else (no --scorer, or "teacher") the teacher of the school world beside the
    files `beside` (see school_teacher). A --scorer is called once on `probe` (the command's first
    row, {"prompt": ..., other columns}, or its prompt alone) with PROBE_ANSWERS, so a bad one
    stops the command at once."""
    if reward is not None:
        return RewardModelJudge(reward, tokenizer, device, policy_name=policy_name, batch_size=batch_size)
    if scorer is None or scorer == "teacher":
        return TeacherJudge(school_teacher(*beside))
    judge = FunctionJudge(load_function(scorer), scorer)
    if probe is not None:
        row = probe if isinstance(probe, dict) and "prompt" in probe else {"prompt": probe}
        judge([row["prompt"]] * len(PROBE_ANSWERS), list(PROBE_ANSWERS), **row_fields([row] * len(PROBE_ANSWERS)))
    return judge


def as_judge(judge) -> Judge:
    """A Judge as it is; a Teacher as a TeacherJudge; any other (prompts, responses) -> [float]
    function as a FunctionJudge (for library callers that pass the teacher or a function)."""
    from lmschool.world.teacher import Teacher

    if isinstance(judge, Judge):
        return judge
    if isinstance(judge, Teacher):
        return TeacherJudge(judge)
    return FunctionJudge(judge, getattr(judge, "__name__", "scorer"))
