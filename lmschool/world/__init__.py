"""The school world: lmschool's built-in data for every stage and the gold teacher that judges it.

A seeded generator invents pupils and their facts (facts.py), and writes a pre-training corpus
(corpus.py), SFT conversations, RL prompts, preference pairs and eval sets (dialogues.py) into a
directory with `lmschool world --out DIR` (lmschool/commands/world.py, build.py). The teacher (teacher.py)
scores any (prompt, response) against the facts and, with Bradley-Terry noise, plays the human
rater.

Public API for the other stages:
    lmschool.world.build.write(out, seed=0, preset_name="default", force=False) -> summary
    lmschool.world.build.build(seed, preset_name) -> (files: {name: text}, summary)
    lmschool.world.build.completion_probes(world, heldout=None) -> [(prefix, answer)]
    lmschool.world.teacher.score(prompt, response) -> Score(total, parts)
    lmschool.world.teacher.prefer(prompt, a, b, rng) -> 0 | 1
    lmschool.world.teacher.reward(prompts, responses) -> [float]
    lmschool.world.teacher.Teacher(world) / Teacher.from_file(path) / use_world(path)
"""
