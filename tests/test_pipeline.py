"""`lmschool run` on the tiny preset: every stage runs and leaves its checkpoint; the report's
numbers are finite and in range; a second run redoes nothing; a run killed at any moment and
started again finishes with nothing lost and no finished stage redone. The stage registry is the
one list of stages: the report's stages are the pipeline's."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lmschool.cli import main
from lmschool.pipeline import NAMES, STAGES, names

POLICY_STAGES = ("dpo", "ipo", "simpo", "ppo", "grpo")
CHECKPOINTS = ("pretrain", "sft", "reward", *POLICY_STAGES)


def test_the_registry_names_every_stage_once_with_its_kind():
    assert NAMES == ["world", "base", "pretrain", "sft", "label", "reward", *POLICY_STAGES]
    assert names("policy") == list(POLICY_STAGES) and names("training") == ["pretrain", "sft", "reward"]
    assert [s.name for s in STAGES if s.with_base] == names("base") == ["base"]   # only in a run with --base
    assert {s.name: (s.done_file, s.numbers_file) for s in STAGES if s.done_file != "summary.json"} == \
        {"world": ("world.json", "world.json"), "label": ("prefs.jsonl", "prefs.summary.json")}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline") / "demo"
    assert main(["run", "--out", str(out), "--preset", "tiny"]) == 0
    return out


def test_the_report_has_every_stage_of_the_registry_and_no_bars(tiny_run, capsys):
    report = json.loads((tiny_run / "report.json").read_text())
    assert list(report["stages"]) == [n for n in NAMES if n != "base"] and "bars" not in report   # no --base
    assert main(["run", "--out", str(tiny_run), "--preset", "tiny"]) == 0
    assert "bars met" not in capsys.readouterr().err


def test_every_stage_leaves_its_checkpoint(tiny_run):
    for stage in CHECKPOINTS:
        config = json.loads((tiny_run / stage / "model" / "config.json").read_text())
        assert config["architectures"] == (["LlamaForSequenceClassification"] if stage == "reward"
                                           else ["LlamaForCausalLM"]), stage
        assert (tiny_run / stage / "summary.json").is_file(), stage
    assert sum(1 for _ in open(tiny_run / "label" / "prefs.jsonl")) > 0
    for stage in ("pretrain", "sft", *POLICY_STAGES):   # pre-training: the report's side-by-side prompts
        assert (tiny_run / stage / "eval_answers.jsonl").is_file(), stage
    report = json.loads((tiny_run / "report.json").read_text())
    assert len(report["samples"]) == 4 and all(list(s["answers"]) == ["pretrain", "sft", "dpo", "ppo"]
                                               for s in report["samples"])


def test_policy_stages_read_the_sft_stages_sampled_answers(tiny_run):
    """The SFT stage keeps its sampled eval answers; DPO's and PPO's judging (same settings) read
    them instead of sampling the SFT model again, and find the same SFT figures."""
    sft = json.loads((tiny_run / "sft" / "summary.json").read_text())
    for stage in ("dpo", "ppo"):
        summary = json.loads((tiny_run / stage / "summary.json").read_text())
        assert summary["reference_first_samples"] == "read", stage
        assert summary["sft_teacher_score_sampled"] == sft["teacher_score_sampled"], stage


def test_report_numbers_are_finite_and_in_range(tiny_run):
    report = json.loads((tiny_run / "report.json").read_text())
    stages = report["stages"]
    assert report["seconds_total"] > 0
    rates = {
        "pretrain": ["fact_completion"],
        "sft": ["teacher_score", "correct_heldout_pupils", "correct_train_pupils", "correct_arithmetic",
                "fact_correct", "refusal_correct", "end_of_turn_rate", "flaw_rate", "hallucination_rate",
                "behaviour_score", "demonstration_behaviour_score", "demonstration_flaw_share"],
        "reward": ["accuracy_noise_free", "accuracy_rater"],
        **{s: ["teacher_score", "win_rate_vs_sft", "refusal_correct", "fact_correct", "flaw_rate",
               "hallucination_rate", "behaviour_score", "sft_flaw_rate"] for s in POLICY_STAGES},
        "world": ["demonstration_flaw_share"],
    }
    for stage, keys in rates.items():
        for key in keys:
            value = stages[stage][key]
            assert value is not None and 0.0 <= value <= 1.0, (stage, key, value)
        assert stage == "world" or stages[stage]["seconds"] > 0, stage
    assert stages["pretrain"]["val_bpb"] > 0
    assert -1.0 <= stages["reward"]["teacher_rank_correlation"] <= 1.0
    for stage in POLICY_STAGES:
        assert math.isfinite(stages[stage]["kl_from_sft"]), stage
    text = (tiny_run / "report.md").read_text()
    for png in sorted((tiny_run / "plots").glob("*.png")):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"plots/{png.name}" in text


def test_rerun_redoes_nothing(tiny_run, capsys):
    before = {s: (tiny_run / s / "summary.json").stat().st_mtime_ns for s in CHECKPOINTS}
    capsys.readouterr()
    assert main(["run", "--out", str(tiny_run), "--preset", "tiny"]) == 0
    err = capsys.readouterr().err
    for stage in NAMES:
        assert (f"{stage}: done already" in err) == (stage != "base"), stage   # no base stage without --base
    assert before == {s: (tiny_run / s / "summary.json").stat().st_mtime_ns for s in CHECKPOINTS}


def test_sweep_adds_frontier_points_without_redoing_stages(tiny_run):
    """--sweep on a finished run trains only the sweep points (DPO over beta, PPO over the KL
    coefficient, each with its own value in its config), and the report places them."""
    from lmschool.pipeline import SWEEP_DPO_BETAS, SWEEP_PPO_KL
    before = (tiny_run / "dpo" / "summary.json").stat().st_mtime_ns
    assert main(["run", "--out", str(tiny_run), "--preset", "tiny", "--sweep"]) == 0
    assert (tiny_run / "dpo" / "summary.json").stat().st_mtime_ns == before
    for beta in SWEEP_DPO_BETAS:
        assert yaml.safe_load((tiny_run / "sweep" / f"dpo-beta{beta:g}" / "config.yaml").read_text())["beta"] == beta
    for coef in SWEEP_PPO_KL:
        assert yaml.safe_load((tiny_run / "sweep" / f"ppo-kl{coef:g}" / "config.yaml").read_text())["kl_coef"] == coef
    report = json.loads((tiny_run / "report.json").read_text())
    assert len(report["sweep"]) == len(SWEEP_DPO_BETAS) + len(SWEEP_PPO_KL)
    assert sum(1 for p in report["frontier"] if p.get("sweep")) == len(report["sweep"])


def test_from_redoes_the_stage_and_times_it_afresh(tiny_run):
    """--from grpo retrains GRPO only; its time in timings.json is the new run's, not added to the
    old one (a resumed stage's times add up; a stage started again from nothing starts at 0)."""
    timings = tiny_run / "timings.json"
    old = json.loads(timings.read_text())
    timings.write_text(json.dumps({**old, "grpo": 1000.0}))
    before = {s: (tiny_run / s / "summary.json").stat().st_mtime_ns for s in CHECKPOINTS}
    assert main(["run", "--out", str(tiny_run), "--preset", "tiny", "--from", "grpo"]) == 0
    after = {s: (tiny_run / s / "summary.json").stat().st_mtime_ns for s in CHECKPOINTS}
    assert [s for s in CHECKPOINTS if after[s] != before[s]] == ["grpo"]
    new = json.loads(timings.read_text())
    assert 0 < new["grpo"] < 1000.0 and {k: v for k, v in new.items() if k != "grpo"} == \
        {k: v for k, v in old.items() if k != "grpo"}


def test_a_damaged_world_stops_from_before_it_removes_a_stage(tiny_run, capsys):
    """--from dpo on a run whose world.json was damaged: one line naming the file, and dpo and the
    later stages are still there (they were removed first, then pre-training found the damage)."""
    world = tiny_run / "world" / "world.json"
    text = world.read_text()
    before = {s: (tiny_run / s / "summary.json").stat().st_mtime_ns for s in CHECKPOINTS}
    world.write_text(text[:len(text) // 2])
    try:
        assert main(["run", "--out", str(tiny_run), "--preset", "tiny", "--from", "dpo"]) == 2
        assert str(world) in capsys.readouterr().err
        assert {s: (tiny_run / s / "summary.json").stat().st_mtime_ns for s in CHECKPOINTS} == before
    finally:
        world.write_text(text)


def test_bad_override_names_the_stage_format(tmp_path, capsys):
    assert main(["run", "--out", str(tmp_path / "x"), "--preset", "tiny", "max_steps=3"]) == 2
    assert "STAGE.key=value" in capsys.readouterr().err


def test_unwritable_out_is_reported_before_work(tmp_path, capsys):
    if os.geteuid() == 0:
        pytest.skip("root can write anywhere")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert main(["run", "--out", str(locked / "demo"), "--preset", "tiny"]) == 2
        assert "not writable" in capsys.readouterr().err
        assert not (locked / "demo").exists()
    finally:
        locked.chmod(0o700)


def _tail(log: Path, lines: int = 60) -> str:
    text = log.read_text(errors="replace").splitlines() if log.is_file() else ["(no output)"]
    return f"lmschool run's output ({log}), last {lines} lines:\n" + "\n".join(text[-lines:])


def _run_until(out: Path, extra: list[str], ready, log: Path) -> int:
    """Start `lmschool run` in a subprocess, its output appended to `log`; SIGKILL it as soon as
    ready(out) holds (returns -9), or return its exit status if it ends first.

    The stages are long enough after their first checkpoint (hundreds of steps) that this poll,
    asleep 10 ms between looks, sees the checkpoint long before the stage can finish, however busy
    the machine. The child keeps its normal priority: at the lowest one, two busy processes beside
    it starved it for many minutes. The one-hour deadline only stops a hung child (the test then
    fails with its output); however slow, a working run is never cut short."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with open(log, "ab") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "lmschool", "run", "--out", str(out), "--preset", "tiny",
                                 *extra], stdout=sink, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 3600
    while proc.poll() is None:
        if ready(out):
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return -9
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            pytest.fail(f"lmschool run did not finish in an hour\n{_tail(log)}")
        time.sleep(0.01)  # the interval between two looks at the run directory, not a wait for an event
    return proc.returncode


def test_kill_during_pretraining_and_during_ppo_then_rerun(tmp_path):
    out, log = tmp_path / "demo", tmp_path / "run.log"
    # Longer stages than the tiny preset's, with the first checkpoint early, so that each kill
    # lands inside its stage: the kill follows the checkpoint, however late, while most of the
    # stage is still to run.
    slow = ["pretrain.max_steps=300", "pretrain.save_every=5", "ppo.max_steps=30", "ppo.save_every=2"]

    def in_pretraining(o):
        return any((o / "pretrain" / "checkpoints").glob("step-*"))

    assert _run_until(out, slow, in_pretraining, log) == -9, _tail(log)
    assert not (out / "pretrain" / "summary.json").exists(), _tail(log)
    world = (out / "world" / "world.json").stat().st_mtime_ns

    def in_ppo(o):
        return any((o / "ppo" / "checkpoints").glob("step-*"))

    assert _run_until(out, slow, in_ppo, log) == -9, _tail(log)
    assert not (out / "ppo" / "summary.json").exists(), _tail(log)
    finished = {s: (out / s / "summary.json").stat().st_mtime_ns for s in ("pretrain", "sft", "reward", "dpo")}
    assert _run_until(out, slow, lambda o: False, log) == 0, _tail(log)
    assert (out / "world" / "world.json").stat().st_mtime_ns == world
    assert finished == {s: (out / s / "summary.json").stat().st_mtime_ns for s in finished}
    metrics = [json.loads(line) for line in open(out / "pretrain" / "metrics.jsonl")]
    steps = [m["step"] for m in metrics if "loss" in m]
    assert steps == sorted(set(steps)) and steps[-1] == 300      # resumed, not restarted or duplicated
    report = json.loads((out / "report.json").read_text())
    assert all(report["stages"][s]["seconds"] > 0 for s in ("pretrain", "ppo", "grpo"))


def test_a_kill_between_labels_two_files_resumes(tiny_run, tmp_path):
    """label writes prefs.summary.json, then prefs.jsonl (its done file): killed in between, the
    next `lmschool run` labels again (it used to stop at "prefs.summary.json exists; pass --force"
    on every rerun) and finishes the pipeline."""
    out = tmp_path / "demo"
    shutil.copytree(tiny_run, out)
    (out / "label" / "prefs.jsonl").unlink()
    for stage in ["reward", *names("policy")]:
        shutil.rmtree(out / stage)
    assert main(["run", "--out", str(out), "--preset", "tiny"]) == 0
    assert [json.loads(line) for line in (out / "label" / "prefs.jsonl").read_text().splitlines()]
    assert all((out / s / "summary.json").is_file() for s in ["reward", *names("policy")])


def test_the_default_run_has_dpo_and_ppo_and_the_sweep_adds_the_other_methods():
    from lmschool.pipeline import pipeline_stages
    default = [s.name for s in pipeline_stages("default", sweep=False)]
    assert default == ["world", "pretrain", "sft", "label", "reward", "dpo", "ppo"]
    swept = [s.name for s in pipeline_stages("default", sweep=True)]
    assert swept[:10] == ["world", "pretrain", "sft", "label", "reward", "dpo", "ipo", "simpo", "ppo", "grpo"]
    assert all(n.startswith("sweep/") for n in swept[10:]) and len(swept) > 10
    assert [s.name for s in pipeline_stages("tiny", sweep=False)] == swept[:10]


def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def test_a_bad_override_stops_run_before_anything_changes(tiny_run, tmp_path, capsys):
    """Every stage's config is built with its overrides before a stage runs and before --from removes
    a stage: a bad key=value is one line, and the finished run (or a fresh --out) is untouched."""
    before = _tree(tiny_run)
    assert main(["run", "--out", str(tiny_run), "--preset", "tiny", "--from", "sft", "dpo.beta=-1"]) == 2
    err = capsys.readouterr().err
    assert "stage dpo" in err and "beta" in err and _tree(tiny_run) == before
    fresh = tmp_path / "fresh"
    assert main(["run", "--out", str(fresh), "--preset", "tiny", "ppo.max_stepz=3"]) == 2
    assert "max_stepz" in capsys.readouterr().err and not fresh.exists()


def test_run_refuses_an_out_that_is_not_a_run(tmp_path, capsys):
    mine = tmp_path / "thesis"
    mine.mkdir()
    (mine / "thesis.tex").write_text("mine")
    assert main(["run", "--out", str(mine), "--preset", "tiny"]) == 2
    assert "not an `lmschool run` directory" in capsys.readouterr().err
    assert sorted(p.name for p in mine.iterdir()) == ["thesis.tex"]
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(["run", "--out", str(afile / "run"), "--preset", "tiny"]) == 2
    assert "is a file" in capsys.readouterr().err
