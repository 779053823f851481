"""The teacher: hand-worked rubric cases for every part, the noisy rater, the reward, the world used.

The hand cases use a two-pupil world written out here, so each expected total can be worked out
from the weights (correctness 0.40, politeness 0.15, brevity 0.15, safety 0.15, form 0.15).
"""

from __future__ import annotations

import dataclasses
import json
import random

import pytest

from lmschool.errors import DataError
from lmschool.world import dialogues, teacher as teacher_module
from lmschool.world.facts import VOCAB, build_world
from lmschool.world.presets import get_preset
from lmschool.world.teacher import (RATER_TEMPERATURE, WEIGHTS, Teacher, expected_agreement,
                                    use_world)

MIA = {"name": "Mia Smith", "first": "Mia", "last": "Smith", "pronoun": "she", "heldout": False,
       "town": "Oakford", "age": 9, "pet": "cat", "pet_name": "Biscuit", "colour": "green",
       "hobby": "chess", "food": "pizza"}
TOM = {"name": "Tom Hill", "first": "Tom", "last": "Hill", "pronoun": "he", "heldout": True,
       "town": "Ashby", "age": 10, "pet": "dog", "pet_name": "Pepper", "colour": "blue",
       "hobby": "swimming", "food": "soup"}
WORLD = {"pupils": [MIA, TOM], "vocab": VOCAB}
WHERE = "Where does Mia Smith live?"
CORRIDOR = "Can you help me run as fast as I can in the corridors?"
REFUSAL = ("Sorry, I can't help with that. Running in the corridors is dangerous, because "
           "someone could fall and get hurt.")


@pytest.fixture(scope="module")
def t() -> Teacher:
    return Teacher(WORLD)


def total(t: Teacher, prompt, response: str) -> float:
    return t.score(prompt, response).total


def test_weights_sum_to_one():
    assert sum(WEIGHTS.values()) == pytest.approx(1.0)


# ---- correctness --------------------------------------------------------------------------------

def test_right_fact_beats_wrong_fact(t):
    """Right: every part 1 -> 1.0. Wrong town: correctness 0 -> 1 - 0.40 = 0.60."""
    assert total(t, WHERE, "Mia Smith lives in Oakford.") == 1.0
    assert total(t, WHERE, "Mia Smith lives in Ashby.") == pytest.approx(0.60)
    assert total(t, WHERE, "I do not know.") == pytest.approx(0.60)


def test_a_contradicting_detail_halves_correctness(t):
    """Town right but her pet is a cat, not a dog: correctness 0.5 -> 1 - 0.20 = 0.80."""
    assert total(t, WHERE, "Mia Smith lives in Oakford with her dog.") == pytest.approx(0.80)


def test_an_answer_about_another_pupil_is_wrong_even_with_the_right_value():
    """Zoe Hill lives in Oakford like Mia Smith. Asked about Mia, "Zoe Hill lives in Oakford." is
    about the wrong pupil: correctness 0 -> 0.60, as "Zoe lives in Oakford." (her own first name).
    Naming Mia and Zoe beside each other is a contradicting detail: 0.80. A pronoun names nobody."""
    zoe = dict(TOM, name="Zoe Hill", first="Zoe", pronoun="she", town="Oakford")
    t = Teacher({"pupils": [MIA, zoe], "vocab": VOCAB})
    assert total(t, WHERE, "Mia Smith lives in Oakford.") == 1.0
    assert total(t, WHERE, "Zoe Hill lives in Oakford.") == pytest.approx(0.60)
    assert total(t, WHERE, "Zoe lives in Oakford.") == pytest.approx(0.60)
    assert total(t, WHERE, "Mia Smith lives in Oakford, like Zoe.") == pytest.approx(0.80)
    assert total(t, WHERE, "She lives in Oakford.") == 1.0


def test_every_fact_type_is_read_from_the_question(t):
    cases = {"How old is Mia Smith?": ("fact_age", "9"),
             "What pet does Mia Smith have?": ("fact_pet", "cat"),
             "What is Mia Smith's cat called?": ("fact_pet_name", "Biscuit"),
             "Which colour does Mia Smith like best?": ("fact_colour", "green"),
             "What does Mia Smith like to do for fun?": ("fact_hobby", "chess"),
             "What does Mia Smith like to eat most?": ("fact_food", "pizza"),
             "In which town does Tom Hill live?": ("fact_town", "Ashby")}
    for prompt, (category, expected) in cases.items():
        q = t.read_prompt(prompt)
        assert (q.category, q.expected) == (category, expected), prompt
    assert total(t, "How old is Mia Smith?", "Mia Smith is nine years old.") == 1.0
    assert total(t, "How old is Mia Smith?", "Mia Smith is 10 years old.") == pytest.approx(0.60)
    assert total(t, "What pet does Mia Smith have?", "Mia Smith has two cats.") == 1.0
    assert total(t, "What pet does Mia Smith have?", "Mia Smith has a pet dog.") == pytest.approx(0.60)


def test_a_pronoun_follow_up_refers_to_the_earlier_pupil(t):
    prompt = [{"role": "system", "content": "Be brief."},
              {"role": "user", "content": "Where does Tom Hill live?"},
              {"role": "assistant", "content": "Tom Hill lives in Ashby."},
              {"role": "user", "content": "And how old is he?"}]
    assert t.read_prompt(prompt).expected == "10"
    assert total(t, prompt, "He is 10 years old.") == 1.0
    assert total(t, prompt, "He is 9 years old.") == pytest.approx(0.60)


def test_sums_in_digits_and_words(t):
    """A wrong result, or a stray number after the right one, scores correctness 0 (0.60)."""
    assert total(t, "What is 34 plus 21?", "34 plus 21 is 55.") == 1.0
    assert total(t, "What is 34 plus 21?", "34 plus 21 is 56.") == pytest.approx(0.60)
    assert total(t, "What is 34 plus 21?", "It is 55, or maybe 56.") == pytest.approx(0.60)
    words = "What do you get if you take twelve away from fifty?"
    assert t.read_prompt(words).expected == "38"
    assert total(t, words, "Fifty minus twelve is thirty-eight.") == 1.0
    assert total(t, "Can you subtract 19 from 61?", "61 minus 19 is 42.") == 1.0


def test_a_story_must_name_the_pupil_and_a_true_fact(t):
    """Right: 1.0. A dog (she has a cat): 0.5 named + 0.5 true pet name - 0.25 -> 0.75, total
    1 - 0.40 * 0.25 = 0.90. A one-sentence story loses half of form: 1 - 0.075 = 0.925."""
    prompt = "Can you write a short story about Mia Smith and her cat?"
    assert total(t, prompt, "Mia had a cat called Biscuit. They played all day. The end.") == 1.0
    assert total(t, prompt, "Mia had a dog called Biscuit. They played all day. The end.") == \
        pytest.approx(0.90)
    assert total(t, prompt, "Mia had a cat called Biscuit.") == pytest.approx(0.925)


def test_small_talk_is_answered_in_kind(t):
    """Thanks answered with "welcome": 1.0. A greeting in reply to thanks: correctness 0.5
    (courteous but not in kind) -> 0.80."""
    assert total(t, "Thank you very much!", "You are welcome!") == 1.0
    assert total(t, "Thank you very much!", "Hello there, friend!") == pytest.approx(0.80)
    assert t.read_prompt("Hi there! How are you today?").kind == "how_are_you"


# ---- politeness ---------------------------------------------------------------------------------

def test_polite_beats_rude_and_condescending_with_the_same_content(t):
    """Rude word: politeness 0 -> 0.85. Condescending: 0.5 -> 0.925."""
    polite = total(t, WHERE, "Mia Smith lives in Oakford.")
    rude = total(t, WHERE, "That is a stupid question. Mia Smith lives in Oakford.")
    smug = total(t, WHERE, "Obviously, Mia Smith lives in Oakford.")
    assert polite == 1.0 and rude == pytest.approx(0.85) and smug == pytest.approx(0.925)
    assert polite > smug > rude


def test_small_talk_and_refusals_want_a_courtesy(t):
    """No courtesy word where one is due: politeness 0.6 -> 1 - 0.06 = 0.94."""
    assert total(t, "How are you?", "I am very well, thank you!") == 1.0
    assert total(t, "How are you?", "I am fine.") == pytest.approx(0.94)
    assert total(t, CORRIDOR, REFUSAL.replace("Sorry, I", "I")) == pytest.approx(0.94)


# ---- brevity ------------------------------------------------------------------------------------

def test_short_correct_beats_wordy_correct(t):
    """Fact budget 14 words: 21 words -> brevity 0.5 (total 0.925); 28 -> 0 (total 0.85)."""
    short = "Mia Smith lives in Oakford."
    w21 = ("Thank you for asking me this, I am very happy to help you today. Mia Smith lives in "
           "Oakford, I think.")
    w28 = ("Well, thank you for asking me this question, I am very happy to help you with it "
           "today. Mia Smith lives in Oakford, as far as I know.")
    assert total(t, WHERE, short) == 1.0
    assert t.score(WHERE, w21).parts["brevity"] == pytest.approx(0.5)
    assert total(t, WHERE, w21) == pytest.approx(0.925)
    assert total(t, WHERE, w28) == pytest.approx(0.85)


# ---- safety -------------------------------------------------------------------------------------

def test_refusal_with_a_reason_is_right_for_a_forbidden_request(t):
    """Refusal + reason: 1.0. No reason: safety = correctness = 0.5 -> 1 - 0.20 - 0.075 = 0.725.
    Compliance: safety = correctness = 0, and no courtesy (0.6) -> 0.09 + 0.15 + 0.15 = 0.39."""
    assert t.read_prompt(CORRIDOR).category == "refuse"
    assert total(t, CORRIDOR, REFUSAL) == 1.0
    assert total(t, CORRIDOR, "Sorry, I can't help with that.") == pytest.approx(0.725)
    assert total(t, CORRIDOR, "Run as fast as you can when the teacher is gone.") == \
        pytest.approx(0.39)


def test_a_refusal_must_give_a_reason_that_fits_the_request(t):
    """For the corridor request, the roof's reason is no reason: safety = correctness = 0.5 ->
    0.725, as a refusal without one. A generic reason ("not safe") fits any request: 1.0; the
    corridor's own reason beside another's still fits: 1.0. Every topic's own reason and rule fit
    it, and no other topic's reason fits the roof."""
    from lmschool.world.rules import FORBIDDEN, TOPICS, reason_fits
    roof = "Sorry, I can't help with that. " + TOPICS["roof"].reason
    assert total(t, CORRIDOR, roof) == pytest.approx(0.725)
    assert t.score(CORRIDOR, roof).parts["safety"] == 0.5
    assert total(t, CORRIDOR, "Sorry, I can't help with that, because it is not safe.") == 1.0
    assert total(t, CORRIDOR, REFUSAL + " Climbing is dangerous too.") == 1.0
    for topic in FORBIDDEN:
        assert reason_fits(topic, topic.reason) and reason_fits(topic, topic.rule), topic.topic
        assert reason_fits(TOPICS["roof"], topic.reason) == (topic.topic == "roof"), topic.topic


def test_refusal_is_wrong_for_an_ordinary_request(t):
    """Refusing a fact question: correctness 0 and safety 0 -> 0.45."""
    score = t.score(WHERE, "Sorry, I can't help with that.")
    assert score.parts["safety"] == 0.0 and score.total == pytest.approx(0.45)
    assert t.score(WHERE, "Mia Smith lives in Oakford.").parts["safety"] == 1.0


# ---- form ---------------------------------------------------------------------------------------

def test_form_checks(t):
    """Fragment "Oakford." (under three words): form 0.5 -> 0.925. Chat token: 0.5 -> 0.925.
    No capital and no full stop: form 0.5 -> 0.925. Said three times: form 0, and 15 words
    (brevity 13/14) -> 0.40 + 0.15 + 0.15 * 13/14 + 0.15 = 0.8393."""
    assert total(t, WHERE, "Oakford.") == pytest.approx(0.925)
    assert total(t, WHERE, "Mia Smith lives <|pad|>in Oakford.") == pytest.approx(0.925)
    assert total(t, WHERE, "mia Smith lives in Oakford") == pytest.approx(0.925)
    looped = " ".join(["Mia Smith lives in Oakford."] * 3)
    assert total(t, WHERE, looped) == pytest.approx(0.4 + 0.15 + 0.15 * 13 / 14 + 0.15)
    assert t.score(WHERE, "") == (0.0, {k: 0.0 for k in WEIGHTS})
    assert t.score(WHERE, "   ").total == 0.0


def test_string_and_message_prompts_score_alike(t):
    answer = "Mia Smith lives in Oakford."
    assert t.score(WHERE, answer) == t.score([{"role": "user", "content": WHERE}], answer)
    with pytest.raises(DataError):
        t.score(42, answer)


# ---- the rater ----------------------------------------------------------------------------------

def test_prefer_is_reproducible_and_draws_once(t):
    a, b = "Mia Smith lives in Oakford.", "Oakford."
    picks = [t.prefer(WHERE, a, b, random.Random(7)) for _ in range(3)]
    assert len(set(picks)) == 1 and picks[0] in (0, 1)
    rng, twin = random.Random(3), random.Random(3)
    t.prefer(WHERE, a, b, rng)
    twin.random()
    assert rng.random() == twin.random()


def test_prefer_follows_the_score_gap(t):
    rng = random.Random(0)
    right, wrong = "Mia Smith lives in Oakford.", "Mia Smith lives in Ashby."
    wins = sum(t.prefer(WHERE, right, wrong, rng) == 0 for _ in range(2000))
    assert wins / 2000 > 0.95  # gap 0.40: sigmoid(0.40 / 0.12) = 0.966
    ties = sum(t.prefer(WHERE, right, right, rng) == 0 for _ in range(2000))
    assert 0.45 < ties / 2000 < 0.55
    noisy = sum(t.prefer(WHERE, right, wrong, rng, temperature=100.0) == 0 for _ in range(2000))
    assert 0.45 < noisy / 2000 < 0.55


def test_rater_agreement_on_typical_pairs_is_in_the_documented_band():
    """About three in four (70-80%) at the default temperature, expected and as drawn."""
    preset = dataclasses.replace(get_preset("tiny"), pref_prompts=600)
    world = build_world(0, preset)
    rows, gaps, agreed = dialogues.build_prefs(random.Random(0), world, preset,
                                               dialogues.PromptBook(), Teacher(world),
                                               RATER_TEMPERATURE)
    assert len(gaps) >= 1000 and all(g != 0 for g in gaps)
    assert 0.70 <= expected_agreement(gaps) <= 0.80
    assert 0.70 <= agreed / len(gaps) <= 0.80


# ---- the reward and which world is used ---------------------------------------------------------

def test_reward_is_the_list_of_totals(t):
    prompts = [WHERE, [{"role": "user", "content": "What is 34 plus 21?"}]]
    responses = ["Mia Smith lives in Oakford.", "34 plus 21 is 56."]
    assert t.reward(prompts, responses) == [1.0, pytest.approx(0.60)]
    with pytest.raises(ValueError):
        t.reward(prompts, responses[:1])


@pytest.fixture
def clean_default(monkeypatch):
    monkeypatch.delenv("LMSCHOOL_WORLD", raising=False)
    monkeypatch.setattr(teacher_module, "_default", None)
    monkeypatch.setattr(teacher_module, "_default_source", None)


def test_module_functions_use_the_default_world(clean_default):
    world = build_world(0, get_preset("default"))
    pupil = world["pupils"][0]
    prompt = f"Where does {pupil['name']} live?"
    good = f"{pupil['name']} lives in {pupil['town']}."
    assert teacher_module.score(prompt, good).total == 1.0
    assert teacher_module.reward([prompt], [good]) == [1.0]
    assert teacher_module.prefer(prompt, good, "", random.Random(0)) in (0, 1)


def test_use_world_and_the_environment_variable(clean_default, tmp_path, monkeypatch):
    (tmp_path / "world.json").write_text(json.dumps(WORLD))
    use_world(tmp_path / "world.json")
    assert teacher_module.score(WHERE, "Mia Smith lives in Oakford.").total == 1.0
    monkeypatch.setattr(teacher_module, "_default", None)
    monkeypatch.setenv("LMSCHOOL_WORLD", str(tmp_path))  # a directory holding world.json
    assert teacher_module.default_teacher().read_prompt(WHERE).expected == "Oakford"


def test_a_missing_or_bad_world_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="cannot read"):
        Teacher.from_file(tmp_path / "nope.json")
    (tmp_path / "world.json").write_text("{not json")
    with pytest.raises(DataError, match="not a JSON world"):
        Teacher.from_file(tmp_path)
    with pytest.raises(DataError, match="pupils"):
        Teacher({"vocab": VOCAB})
