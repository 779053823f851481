"""lmschool.judges: the teacher judge equals Teacher.score (totals and rubric); the function judge
by hand and its error cases (each a one-line UserError); the reward-model judge's text path equals
its token-id path and the score worked out from the model's own forward; the command-line spec and
the school world beside the data."""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from lmschool.checkpoint import load_model, save_model
from lmschool.data.prompts import read_prompts
from lmschool.errors import UserError
from lmschool.judges import (FunctionJudge, Judge, RewardModelJudge, TeacherJudge, as_judge, load_function,
                             make_judge, school_teacher, world_file)
from lmschool.model import ModelConfig, build_model
from lmschool.tokenizer import train_tokenizer
from lmschool.world.teacher import Teacher, default_teacher

pytestmark = pytest.mark.usefixtures("one_thread")


def word_count(prompts, responses):
    """A test scorer (module:function): the number of words of each response, as ints."""
    return [len(r.split()) for r in responses]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer([], byte_level=True)


@pytest.fixture(scope="module")
def rm(tok, tmp_path_factory):
    """A random reward model (context 64) whose checkpoint stores reward_bias 0.5."""
    path = tmp_path_factory.mktemp("rm") / "model"
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, max_position_embeddings=64)
    save_model(path, build_model(cfg, head="score", seed=1), tok, {"kind": "reward", "reward_bias": 0.5})
    return path


# ---- the teacher -----------------------------------------------------------------------------------

def test_teacher_judge_equals_teacher_score(world):
    """Two answers to each eval prompt (its reference, and "No."), the copies of a prompt side by
    side as `lmschool label` passes them: every total and rubric equals Teacher.score of that pair,
    the eval rows' fields change nothing, and a prompt's category is the teacher's reading of it."""
    rows = read_prompts(world / "eval.jsonl")
    teacher = school_teacher(world / "eval.jsonl")
    judge = TeacherJudge(teacher)
    prompts = [r["prompt"] for r in rows for _ in range(2)]
    answers = [a for r in rows for a in (r["reference"], "No.")]
    scores, parts = judge(prompts, answers)
    expected = [teacher.score(p, a) for p, a in zip(prompts, answers)]
    assert scores == [s.total for s in expected] and parts == [s.parts for s in expected]
    assert len(set(scores)) > 1 and set(parts[0]) == {"correctness", "politeness", "brevity", "safety", "form"}
    assert judge(prompts, answers, category=[None] * len(prompts)) == (scores, parts)
    assert [judge.category(r["prompt"]) for r in rows] == [teacher.read_prompt(r["prompt"]).category for r in rows]
    assert judge.score_key == "teacher_score" and judge([], []) == ([], [])


# ---- a module:function -------------------------------------------------------------------------------

def test_function_judge_by_hand():
    """word_count on "a b", "" and "c d e": 2, 0, 3 words, as floats; no rubric. No answers: the
    function is not called."""
    judge = FunctionJudge(word_count, "test_judges:word_count")
    scores, parts = judge([[{"role": "user", "content": "q"}]] * 3, ["a b", "", "c d e"])
    assert scores == [2.0, 0.0, 3.0] and all(type(s) is float for s in scores) and parts == [None] * 3
    assert judge.score_key == "score" and judge.category("anything") == "all"
    called = []
    assert FunctionJudge(lambda p, r: called.append(1), "f")([], []) == ([], []) and not called


@pytest.mark.parametrize("returns, message", [
    (["high", "low"], "must return one number per response; it returned ['high', 'low']"),
    (None, "must return one number per response; it returned None"),
    ([1.0], "returned 1 scores for 2 responses"),
    ([1.0, 2.0, 3.0], "returned 3 scores for 2 responses"),
    ([float("nan"), 1.0], "returned a non-finite score (nan)"),
    ([1.0, -math.inf], "returned a non-finite score (-inf)"),
])
def test_function_judge_errors_are_one_line(returns, message):
    judge = FunctionJudge(lambda prompts, responses: returns, "mine:f")
    with pytest.raises(UserError) as e:
        judge(["p", "q"], ["a", "b"])
    assert str(e.value).startswith("--scorer mine:f ") and message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("spec, message", [
    ("no_colon", "must look like module:function"),
    ("no_such_module_here:f", "cannot import module 'no_such_module_here'"),
    ("test_judges:missing", "has no function 'missing'"),
])
def test_bad_function_specs_are_clear_errors(spec, message):
    with pytest.raises(UserError, match=message):
        load_function(spec)


# ---- a reward model ------------------------------------------------------------------------------------

PROMPTS = [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "what is two plus two?"}],
           [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "tell me a story"}]]
ANSWERS = ["hello", "Four.", "Once upon a time a cat sat."]


def test_reward_model_judge_is_the_score_at_the_last_token_minus_the_bias(tok, rm):
    """Each answer alone: render(prompt) + encode(answer) + <|im_end|>, cut from the left to the
    context of 64 (the third is longer), one forward of the reward model, the score at the last
    position, less the checkpoint's reward_bias 0.5 (bias=0.0: raw)."""
    judge = RewardModelJudge(rm, tok, "cpu")
    model = load_model(rm, head="score").eval()
    scores, parts = judge(PROMPTS, ANSWERS)
    raw, _ = RewardModelJudge(rm, tok, "cpu", bias=0.0)(PROMPTS, ANSWERS)
    for p, a, got, got_raw in zip(PROMPTS, ANSWERS, scores, raw):
        ids = tok.render(p, add_generation_prompt=True)[0] + tok.encode(a) + [tok.im_end_id]
        with torch.no_grad():
            expected = model(torch.tensor([ids[-64:]]))[0, -1].item()
        assert got == pytest.approx(expected - 0.5, abs=1e-5) and got_raw == pytest.approx(expected, abs=1e-5)
    assert len(ids) > 64 and parts == [None] * 3 and judge.bias == 0.5 and judge.score_key == "score"


def test_reward_model_judge_text_path_equals_its_token_id_path(tok, rm):
    """PPO's rollouts: the same answers as right-padded token ids (N, L) and each row's last index
    (N,), scored without decoding, give exactly the text path's numbers at the same batch size
    (2: rows 0-1, then row 2), and the same to float rounding at another (1)."""
    judge = RewardModelJudge(rm, tok, "cpu", batch_size=2)
    seqs = [(tok.render(p, add_generation_prompt=True)[0] + tok.encode(a) + [tok.im_end_id])[-64:]
            for p, a in zip(PROMPTS, ANSWERS)]
    L = max(map(len, seqs))
    input_ids = torch.tensor([s + [tok.fill_id] * (L - len(s)) for s in seqs])                # (3, L)
    last_index = torch.tensor([len(s) - 1 for s in seqs])                                     # (3,)
    text, _ = judge(PROMPTS, ANSWERS)
    ids = judge.score_ids(input_ids, last_index, 2)
    assert ids.shape == (3,) and ids.tolist() == text
    assert judge.rollout_scores(PROMPTS, ANSWERS, input_ids, last_index, 2).tolist() == text
    assert judge.score_ids(input_ids, last_index, 1).tolist() == pytest.approx(text, abs=1e-5)
    # a function judge scores the texts of a rollout: a tensor on the ids' device
    words = FunctionJudge(word_count, "words").rollout_scores(PROMPTS, ANSWERS, input_ids, last_index, 2)
    assert words.tolist() == [1.0, 1.0, 7.0] and words.device == input_ids.device


def test_reward_model_judge_checks_kind_and_tokenizer(tok, rm, tmp_path):
    policy = tmp_path / "policy"
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2)
    save_model(policy, build_model(cfg), tok, {"stage": "sft"})
    with pytest.raises(UserError, match="is a policy .*, but --reward needs a reward model"):
        RewardModelJudge(policy, tok)
    other = train_tokenizer(["the cat sat on the mat " * 50], vocab_size=300)
    with pytest.raises(UserError, match="has another tokenizer than --init"):
        RewardModelJudge(rm, other)
    assert RewardModelJudge(rm).tokenizer.vocab_size == tok.vocab_size         # None: its own tokenizer


# ---- the command line and the school world beside the data --------------------------------------------

def test_the_world_beside_any_of_the_files(world, tmp_path):
    bare, held = tmp_path / "bare", tmp_path / "held"
    bare.mkdir(), held.mkdir()
    shutil.copy(world / "world.json", held / "world.json")
    assert world_file(None, bare / "p.jsonl", held / "e.jsonl") == held / "world.json"
    assert world_file(bare / "p.jsonl", None) is None and world_file() is None
    assert school_teacher(bare / "p.jsonl") is default_teacher()
    teacher = school_teacher(bare / "p.jsonl", held / "e.jsonl")
    assert isinstance(teacher, Teacher) and teacher.world == Teacher.from_file(world / "world.json").world


def test_make_judge_reads_the_command_line(tok, rm, world):
    beside = [world / "prompts.jsonl"]
    for scorer in (None, "teacher"):
        judge = make_judge(scorer, beside=beside)
        assert isinstance(judge, TeacherJudge) and judge.teacher.world == school_teacher(*beside).world
    judge = make_judge("test_judges:word_count", beside=beside)
    assert isinstance(judge, FunctionJudge) and judge.function is word_count
    judge = make_judge(None, rm, tokenizer=tok, batch_size=3)
    assert isinstance(judge, RewardModelJudge) and judge.batch_size == 3 and judge.bias == 0.5
    with pytest.raises(UserError, match="cannot import module"):
        make_judge("nope:f")


def test_as_judge_takes_a_teacher_or_a_function(world):
    teacher = school_teacher(world / "eval.jsonl")
    assert isinstance(as_judge(teacher), TeacherJudge) and as_judge(teacher).teacher is teacher
    judge = as_judge(word_count)
    assert isinstance(judge, FunctionJudge) and judge(["p"], ["a b c"]) == ([3.0], [None])
    assert as_judge(judge) is judge and isinstance(judge, Judge)


def test_a_scorer_that_raises_is_one_line_naming_it():
    """A user's scorer that raised was a traceback from eval, label and ppo (bad-input matrix,
    issue 19)."""
    def broken(prompts, responses):
        raise RuntimeError("the scorer\nbroke")

    with pytest.raises(UserError, match=r"--scorer my:broken raised RuntimeError: the scorer broke; it is called "
                                        r"as function\(prompts, responses\)"):
        FunctionJudge(broken, "my:broken")(["p"], ["r"])


def test_a_scorer_that_cannot_take_prompts_and_responses_is_refused_before_any_work():
    """json:dumps failed only at its first call, after ppo had opened --out (bad-input matrix)."""
    with pytest.raises(UserError, match=r"--scorer json:dumps takes \(obj, \*, .*\.\.\.; it must take \(prompts, responses\)"):
        load_function("json:dumps")
    assert callable(load_function("lmschool.world.teacher:reward"))


def test_a_world_without_its_keys_is_named_by_its_file(tmp_path):
    """The teacher's error for a world.json without 'pupils' did not say which file (bad-input matrix)."""
    from lmschool.judges import school_teacher

    (tmp_path / "world.json").write_text('{"seed": 0}')
    (tmp_path / "eval.jsonl").write_text("")
    with pytest.raises(UserError, match=f"{tmp_path / 'world.json'}: a world needs 'pupils'"):
        school_teacher(tmp_path / "eval.jsonl")
