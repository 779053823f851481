"""Bad inputs across every command (issue 19): a matrix of a few hundred bad inputs, each run
through `lmschool.cli.main` in-process, a sample also as a real subprocess, and a table of how
each was handled.

    nice -n 19 .venv/bin/python bench/bad_inputs.py [--markdown] [--only CMD[,CMD]] [--match TEXT] [--base DIR]

It first builds, in a temporary directory, what the cases need: `lmschool run --preset tiny` (a
tiny world and every stage's tiny checkpoint, about 20 s to 2 min), then damaged copies of its
files and checkpoints. The cases are generated, not listed by hand: for each command, each file
argument x each damage that fits its format; each config key family x bad values; --out problems;
bad checkpoints for every checkpoint argument; bad `run` overrides; wrong argument combinations.

For every case it records the exit status, whether stderr is exactly one line (the project's rule:
one line naming the file, line or key and the fix; for `run`, whose stderr carries every stage's
progress, the lines with ": error:"),
whether a traceback or an uncaught exception appeared, whether the bad input was accepted (exit 0),
whether anything that existed before changed or went (damaged: the temporary tree's paths, sizes
and mtimes before and after each case), and whether a failed case left new files behind (wrote).
A case is clean when it failed with exit 2 and one line, no traceback, nothing damaged or written.
A few cases are not bad input but a state a command must work through, such as the torn last line
of metrics.jsonl that a run killed mid-write leaves: clean is then exit 0, no traceback, nothing
damaged, and one stderr line saying so (the case's `note`).

--base DIR reuses a finished `lmschool run --preset tiny` in DIR (faster while developing).
--match TEXT runs only the cases whose "command / description" holds TEXT.

The "--out in a read-only directory" cases need a directory the command cannot write into. Root
writes into a chmod 0o555 directory anyway, but not into a read-only file system: as root the
matrix mounts a small read-only tmpfs there (and unmounts it after the case); where it cannot
mount one, the case says "(root writes anyway)".
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CONFIGS = ROOT / "configs"
COMMANDS = ["world", "tokenizer", "pretrain", "sft", "label", "reward", "dpo", "ppo", "generate", "chat",
            "eval", "score", "run", "report"]
CASE_SECONDS = 300


@dataclass
class Case:
    command: str
    name: str
    argv: list[str]                                  # "{W}" stands for the case's own directory
    setup: Callable[[Path], None] | None = None      # makes the case's fixtures in its directory
    stdin: str = "hello\n"
    subprocess: bool = False                         # also run as a real process
    output: tuple[str, ...] = ()                     # paths ("{W}/...") it may rewrite when it succeeds
    note: str = ""                                   # not bad input: a state to work through (exit 0)
                                                     # with one stderr line that holds this text

    def resolved(self, work: Path) -> list[str]:
        return [a.replace("{W}", str(work)) for a in self.argv]


@dataclass
class Result:
    case: Case
    status: int | None
    stderr: str
    exception: str = ""
    lines: int = 0
    traceback: bool = False
    damaged: list[str] = field(default_factory=list)
    wrote: list[str] = field(default_factory=list)
    seconds: float = 0.0
    sub: dict | None = None

    @property
    def accepted(self) -> bool:   # a bad input taken as good (a note case is meant to succeed)
        return self.status == 0 and not self.case.note

    @property
    def not_one_line(self) -> bool:
        return not self.accepted and not self.traceback and self.lines != 1

    @property
    def exit_not_2(self) -> bool:   # for a note case: its exit is not 0
        return not self.accepted and not self.traceback and self.status != (0 if self.case.note else 2)

    @property
    def no_note(self) -> bool:
        return bool(self.case.note) and self.case.note not in self.stderr

    @property
    def clean(self) -> bool:
        return not (self.accepted or self.traceback or self.not_one_line or self.exit_not_2 or self.damaged
                    or self.wrote or self.no_note)

    def why(self) -> str:
        parts = []
        if self.traceback:
            parts.append(f"traceback ({self.exception or 'in stderr'})")
        if self.accepted:
            parts.append("accepted (exit 0)")
        if self.not_one_line:
            parts.append(f"{self.lines} stderr lines")
        if self.exit_not_2:
            parts.append(f"exit {self.status}")
        if self.no_note:
            parts.append(f"no line saying {self.case.note!r}")
        if self.damaged:
            parts.append("damaged " + ", ".join(self.damaged[:3]))
        if self.wrote:
            parts.append("wrote " + ", ".join(self.wrote[:3]))
        return "; ".join(parts)


# ---- the things the cases need ------------------------------------------------------------------

def build_base(tmp: Path, base: Path | None) -> Path:
    run = tmp / "run"
    if base is not None:
        shutil.copytree(base, run)
        return run
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1"}
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "lmschool", "run", "--preset", "tiny", "--out", str(run)],
                          cwd=tmp, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"bad_inputs: the tiny run failed:\n{proc.stderr[-3000:]}")
    print(f"built the tiny run in {time.time() - t0:.0f}s", file=sys.stderr)
    return run


def head_lines(path: Path, n: int) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()[:n]


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def make_files(tmp: Path, run: Path) -> dict[str, dict[str, Path]]:
    """Damaged data files by format: {format: {damage: path}}; "ok" is a good file of the format."""
    d = tmp / "files"
    d.mkdir()
    (d / "a_directory").mkdir()
    (d / "a_directory" / "x.txt").write_text("x\n")
    empty = d / "empty.jsonl"
    empty.write_text("")
    not_utf8 = d / "not_utf8.jsonl"
    not_utf8.write_bytes(b'{"text": "caf\xe9"}\n\xff\xfe\x00bad\n')
    world = run / "world"
    good = {
        "corpus": world / "corpus.txt",
        "conversations": world / "sft.jsonl",
        "prompts": world / "prompts.jsonl",
        "eval": world / "eval.jsonl",
        "prefs": run / "label" / "prefs.jsonl",
        "answers": run / "sft" / "eval_answers.jsonl",
    }
    common = {"missing": d / "no_such_file.jsonl", "directory": d / "a_directory", "empty": empty,
              "not_utf8": not_utf8}

    def variant(fmt: str, name: str, bad_line: str, keep: int = 2) -> Path:
        lines = head_lines(good[fmt], keep) if good[fmt].suffix == ".jsonl" else []
        return write_lines(d / f"{fmt}_{name}.jsonl", lines + [bad_line])

    files: dict[str, dict[str, Path]] = {}
    ws = d / "whitespace.txt"
    ws.write_text("\n  \n\t\n")
    files["corpus"] = {**common, "whitespace_only": ws,
                       "not_utf8_text": _bytes(d / "corpus_not_utf8.txt", b"Anna lives in Hull.\n\xff\xfe\n"),
                       "jsonl_bad_json": write_lines(d / "corpus_bad.jsonl", ['{"text": "a"}', '{"text": "b"']),
                       "jsonl_no_text_key": write_lines(d / "corpus_txt.jsonl", ['{"txt": "a"}']),
                       "jsonl_text_not_string": write_lines(d / "corpus_int.jsonl", ['{"text": 5}']),
                       "jsonl_array_line": write_lines(d / "corpus_array.jsonl", ['["a", "b"]'])}
    user = {"role": "user", "content": "Hi"}
    files["conversations"] = {
        **common,
        "bad_json": variant("conversations", "bad_json", '{"messages": [{"role": "user"'),
        "not_an_object": variant("conversations", "array", '[1, 2, 3]'),
        "wrong_schema": variant("conversations", "schema", '{"msgs": []}'),
        "messages_not_list": variant("conversations", "msgs_str", '{"messages": "hello"}'),
        "empty_messages": variant("conversations", "msgs_empty", '{"messages": []}'),
        "unknown_role": variant("conversations", "role", json.dumps(
            {"messages": [user, {"role": "robot", "content": "beep"}]})),
        "content_not_string": variant("conversations", "content", json.dumps(
            {"messages": [user, {"role": "assistant", "content": 5}]})),
        "no_assistant_turn": variant("conversations", "no_assistant", json.dumps({"messages": [user]})),
        "all_without_assistant": write_lines(d / "conv_all_user.jsonl", [json.dumps({"messages": [user]})] * 3),
        "completion_not_string": variant("conversations", "completion", '{"prompt": "Hi", "completion": 7}'),
    }
    files["prompts"] = {
        **common,
        "bad_json": variant("prompts", "bad_json", '{"prompt": "Hi'),
        "not_an_object": variant("prompts", "array", '"just a string"'),
        "wrong_schema": variant("prompts", "schema", '{"question": "Hi?"}'),
        "prompt_not_text": variant("prompts", "int", '{"prompt": 5}'),
        "ends_with_assistant": variant("prompts", "assistant", json.dumps(
            {"prompt": [user, {"role": "assistant", "content": "Hello"}]})),
        "empty_prompt": variant("prompts", "empty", '{"prompt": ""}'),
    }
    files["eval"] = dict(files["prompts"])
    files["prefs"] = {
        **common,
        "bad_json": variant("prefs", "bad_json", '{"prompt": "Hi", "chosen": "a", '),
        "not_an_object": variant("prefs", "array", "[]"),
        "no_rejected": variant("prefs", "no_rejected", '{"prompt": "Hi", "chosen": "Hello."}'),
        "chosen_not_text": variant("prefs", "chosen_int", '{"prompt": "Hi", "chosen": 1, "rejected": "No."}'),
        "chosen_user_role": variant("prefs", "chosen_user", json.dumps(
            {"prompt": "Hi", "chosen": [user], "rejected": "No."})),
        "bad_split": variant("prefs", "split", '{"prompt": "Hi", "chosen": "Hello.", "rejected": "No.", '
                                                 '"split": "dev"}'),
        "all_test_split": write_lines(d / "prefs_all_test.jsonl", [
            json.dumps({**json.loads(line), "split": "test"}) for line in head_lines(good["prefs"], 4)]),
    }
    files["answers"] = {
        **common,
        "bad_json": variant("answers", "bad_json", '{"prompt": '),
        "wrong_schema": variant("answers", "schema", '{"answer": "x"}'),
        "other_prompts": write_lines(d / "answers_other.jsonl", [json.dumps(
            {"prompt": [{"role": "user", "content": "Something else?"}], "response": "x", "score": 0.5})]),
    }
    files["yaml"] = {
        "missing": d / "no_such.yaml", "directory": d / "a_directory",
        "not_utf8": _bytes(d / "not_utf8.yaml", b"lr: 1\nname: caf\xe9\n"),
        "bad_yaml": _text(d / "bad.yaml", "lr: [1, 2\nmax_steps: 3\n"),
        "a_list": _text(d / "list.yaml", "- lr\n- max_steps\n"),
        "unknown_key": _text(d / "unknown.yaml", "max_stepz: 2\n"),
        "wrong_type": _text(d / "wrong_type.yaml", "warmup_steps: many\n"),
        "tabs": _text(d / "tabs.yaml", "max_steps:\t\t2\n\tlr: 1\n"),
    }
    return files


def _bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def make_checkpoints(tmp: Path, run: Path) -> dict[str, dict[str, Path]]:
    """Damaged copies of the SFT policy and of the reward model: {"policy"|"reward": {damage: dir}}."""
    import torch
    from safetensors.torch import load_file, save_file

    from lmschool.checkpoint import write_manifest

    d = tmp / "ckpts"
    d.mkdir()
    a_file = d / "a_file.txt"
    a_file.write_text("not a checkpoint\n")
    (d / "empty_dir").mkdir()
    out: dict[str, dict[str, Path]] = {}
    for kind, source, other in (("policy", run / "sft" / "model", run / "reward"),
                                ("reward", run / "reward" / "model", run / "sft")):
        cases: dict[str, Path] = {"missing": d / "no_such_checkpoint", "a_file": a_file, "empty_dir": d / "empty_dir",
                                  "other_kind": other}

        def copy(name: str) -> Path:
            target = d / f"{kind}_{name}"
            shutil.copytree(source, target)
            cases[name] = target
            return target

        copy("config_not_json").joinpath("config.json").write_text('{"hidden_size": 64,')
        config = json.loads((source / "config.json").read_text())
        p = copy("config_no_hidden_size")
        p.joinpath("config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "hidden_size"}))
        copy("config_wrong_type").joinpath("config.json").write_text(json.dumps({**config, "hidden_size": "big"}))
        copy("config_not_object").joinpath("config.json").write_text("[1, 2]")
        copy("config_other_shape").joinpath("config.json").write_text(json.dumps({**config, "hidden_size": 32}))
        p = copy("tokenizer_truncated")
        text = p.joinpath("tokenizer.json").read_text()
        p.joinpath("tokenizer.json").write_text(text[: len(text) // 2])
        copy("tokenizer_missing").joinpath("tokenizer.json").unlink()
        copy("tokenizer_config_damaged").joinpath("tokenizer_config.json").write_text("{")
        p = copy("weights_truncated")
        data = p.joinpath("model.safetensors").read_bytes()
        p.joinpath("model.safetensors").write_bytes(data[: len(data) // 3])
        copy("weights_missing").joinpath("model.safetensors").unlink()
        p = copy("weights_same_size_corrupt")
        raw = bytearray(data)
        for i in range(len(raw) // 2, len(raw) // 2 + 256):
            raw[i] ^= 0xFF
        p.joinpath("model.safetensors").write_bytes(bytes(raw))
        p = copy("weights_nan_with_manifest")   # a valid file of NaNs whose manifest agrees
        tensors = {k: torch.full_like(v, float("nan")) for k, v in load_file(source / "model.safetensors").items()}
        save_file(tensors, p / "model.safetensors", metadata={"format": "pt"})
        (p / "manifest.json").unlink()
        write_manifest(p)
        copy("manifest_damaged").joinpath("manifest.json").write_text("{not json")
        out[kind] = cases
    return out


# ---- the cases ---------------------------------------------------------------------------------

def cases_for(tmp: Path, run: Path, files: dict, ckpts: dict) -> list[Case]:
    W = "{W}"
    out = f"{W}/out"
    world, prefs = run / "world", run / "label" / "prefs.jsonl"
    sft, reward = str(run / "sft"), str(run / "reward")
    cfg = {s: str(CONFIGS / f"{s}-tiny.yaml") for s in ("pretrain", "sft", "label", "reward", "dpo", "ppo")}
    base: dict[str, list[str]] = {
        "world": ["world", "--out", out, "--preset", "tiny"],
        "tokenizer": ["tokenizer", "train", "--data", str(world / "corpus.txt"), "--vocab-size", "300",
                      "--out", out],
        "pretrain": ["pretrain", "--data", str(world / "corpus.txt"), "--out", out, "--config", cfg["pretrain"],
                     "max_steps=2", "save_every=0", "eval_tokens=512", "samples=1"],
        "sft": ["sft", "--init", str(run / "pretrain"), "--data", str(world / "sft.jsonl"), "--out", out,
                "--config", cfg["sft"], "max_steps=2", "eval_every=0", "save_every=0"],
        "label": ["label", "--policy", sft, "--prompts", str(world / "prompts.jsonl"), "--out", f"{out}/prefs.jsonl",
                  "--config", cfg["label"], "max_prompts=4"],
        "reward": ["reward", "--init", sft, "--data", str(prefs), "--out", out, "--config", cfg["reward"],
                   "max_steps=2", "bias_answers=4"],
        "dpo": ["dpo", "--init", sft, "--data", str(prefs), "--out", out, "--config", cfg["dpo"], "max_steps=2"],
        "ppo": ["ppo", "--init", sft, "--reward", reward, "--prompts", str(world / "prompts.jsonl"), "--out", out,
                "--config", cfg["ppo"], "max_steps=1"],
        "generate": ["generate", sft, "--prompt", "Hi", "--max-new-tokens", "4"],
        "chat": ["chat", sft, "--max-new-tokens", "4"],
        "eval": ["eval", sft, "--data", str(world / "eval.jsonl"), "--max-new-tokens", "4"],
        "score": ["score", reward, "--prompt", "Hi", "--response", "Hello."],
        "run": ["run", "--preset", "tiny", "--out", out],
        "report": ["report", f"{W}/run"],
    }
    cases: list[Case] = []

    def add(command: str, name: str, argv: list[str], setup=None, stdin: str = "hello\n", note: str = "") -> None:
        output = (f"{W}/run/report", f"{W}/run/plots") if command == "report" else ()
        cases.append(Case(command, name, argv, setup, stdin, output=output, note=note))

    def replace(argv: list[str], flag: str, value: str | None) -> list[str]:
        """argv with `flag`'s value replaced (value None: the flag and its value left out)."""
        i = argv.index(flag)
        return argv[:i] + argv[i + 2:] if value is None else argv[:i + 1] + [value] + argv[i + 2:]

    def with_positional(argv: list[str], value: str) -> list[str]:
        return [argv[0], value] + argv[2:]

    # -- file arguments x damages
    file_args = [("tokenizer", "--data", "corpus"), ("pretrain", "--data", "corpus"),
                 ("sft", "--data", "conversations"), ("sft", "--eval", "eval"), ("sft", "--replay", "corpus"),
                 ("label", "--prompts", "prompts"), ("reward", "--data", "prefs"), ("dpo", "--data", "prefs"),
                 ("dpo", "--eval", "eval"), ("ppo", "--prompts", "prompts"), ("ppo", "--eval", "eval"),
                 ("ppo", "--ptx", "corpus"), ("eval", "--data", "eval")]
    for command, flag, fmt in file_args:
        for damage, path in files[fmt].items():
            argv = list(base[command])
            if flag in argv:
                argv = replace(argv, flag, str(path))
            else:
                argv += [flag, str(path)]
                if flag == "--ptx":
                    argv.append("ptx_coef=0.5")
            add(command, f"{flag} {fmt}: {damage}", argv)
    # the school world beside a data file (its teacher judges, pre-training probes its facts)
    def world_beside(source: Path, damage: bytes):
        def setup(work: Path) -> None:
            (work / "w").mkdir(parents=True)
            shutil.copy2(source, work / "w" / source.name)
            (work / "w" / "world.json").write_bytes(damage)
        return setup

    world_damages = {"not JSON": b'{"pupils": [', "a list": b"[]", "not UTF-8": b'{"a": "\xff"}',
                     "missing keys": b'{"seed": 0}'}
    for command, flag, source in [("pretrain", "--data", world / "corpus.txt"), ("sft", "--eval", world / "eval.jsonl"),
                                  ("label", "--prompts", world / "prompts.jsonl"), ("dpo", "--eval", world / "eval.jsonl"),
                                  ("ppo", "--prompts", world / "prompts.jsonl"), ("eval", "--data", world / "eval.jsonl")]:
        for damage, data in world_damages.items():
            argv = list(base[command])
            target = f"{W}/w/{source.name}"
            argv = replace(argv, flag, target) if flag in argv else argv + [flag, target]
            add(command, f"world.json beside {flag}: {damage}", argv, world_beside(source, data))
    for damage, path in files["answers"].items():
        add("dpo", f"--reference-answers: {damage}",
            base["dpo"] + ["--eval", str(world / "eval.jsonl"), "--reference-answers", str(path)])
    add("dpo", "--reference-answers without --eval", base["dpo"] + ["--reference-answers", str(run / "sft" / "eval_answers.jsonl")])
    for command in ("pretrain", "sft", "label", "reward", "dpo", "ppo"):
        for damage, path in files["yaml"].items():
            add(command, f"--config: {damage}", replace(base[command], "--config", str(path)))

    # -- checkpoint arguments x damages
    ckpt_args = [("pretrain", "--init", "policy"), ("sft", "--init", "policy"), ("label", "--policy", "policy"),
                 ("reward", "--init", "policy"), ("dpo", "--init", "policy"), ("dpo", "--reference", "policy"),
                 ("ppo", "--init", "policy"), ("ppo", "--reward", "reward"), ("generate", "CKPT", "policy"),
                 ("chat", "CKPT", "policy"), ("eval", "CKPT", "policy"), ("eval", "--reward", "reward"),
                 ("score", "CKPT", "reward")]
    for command, flag, kind in ckpt_args:
        for damage, path in ckpts[kind].items():
            argv = list(base[command])
            if flag == "CKPT":
                argv = with_positional(argv, str(path))
            elif flag in argv:
                argv = replace(argv, flag, str(path))
            else:
                argv += [flag, str(path)]
            add(command, f"{flag} {kind}: {damage}", argv)
    tok = ckpts["policy"]
    for damage in ("missing", "a_file", "empty_dir", "tokenizer_truncated", "tokenizer_missing",
                   "tokenizer_config_damaged"):
        add("pretrain", f"--tokenizer: {damage}", base["pretrain"] + ["--tokenizer", str(tok[damage])])

    # -- config keys x bad values (every training stage shares the loop's keys)
    shared = ["max_stepz=2", "max_steps=abc", "max_steps=1.5", "max_steps=-1", "batch_size=0", "batch_size=-4",
              "grad_accum=0", "lr=fast", "lr=-0.001", "lr=0", "lr=nan", "lr=inf", "lr=.inf", "min_lr_ratio=2",
              "beta2=1.5", "grad_clip=-1", "weight_decay=nan", "schedule=step", "precision=fp8", "compile=maybe",
              "device=foo", "device=cuda", "device=cuda:7", "threads=-1", "max_steps", "=5", "max_steps.x=1"]
    specific = {
        "pretrain": ["model.hidden_size=-1", "model.num_attention_heads=3", "model=3", "model.nosuch=1",
                     "model.dropout=1.5", "seq_len=4", "val_fraction=0.9", "vocab_size=100", "byte_level=2"],
        "sft": ["val_fraction=0.7", "loss_on=none", "truncation=cut", "max_seq_len=4", "max_seq_len=100000",
                "epochs=-1", "eval_temperature=-1", "replay_windows=0"],
        "reward": ["test_fraction=1.5", "margin=nan", "max_seq_len=100000", "epochs=0", "bias_answers=-1"],
        "dpo": ["loss=foo", "beta=-0.1", "beta=0", "label_smoothing=0.7", "reference=none", "max_len=100000",
                "max_len=4", "epochs=-2", "kl_samples=-1"],
        "ppo": ["advantage=ppo", "clip_eps=-0.2", "gamma=1.5", "lam=-1", "kl_coef=-1", "max_new_tokens=0",
                "minibatch_size=0", "advantage=grpo group_size=1", "temperature=0", "ptx_coef=0.5",
                "kl_target=0", "compile=true", "max_new_tokens=100000"],
    }
    for command in ("pretrain", "sft", "reward", "dpo", "ppo"):
        for value in shared + specific[command]:
            add(command, f"config {value}", base[command] + value.split())
    for value in ["samples=1", "samples=0", "max_prompts=-1", "max_new_tokens=0", "temperature=0",
                  "temperature=nan", "top_p=0", "top_p=1.5", "top_k=-1", "test_fraction=1", "rater_temperature=-1",
                  "batch_size=0", "device=foo", "precision=fp8", "samplez=3", "samples"]:
        add("label", f"config {value}", base["label"] + [value])
    for flag, value in [("--samples", "-1"), ("--samples", "x"), ("--rater-temperature", "nan"),
                        ("--rater-temperature", "-1")]:
        add("label", f"{flag} {value}", base["label"] + [flag, value])

    # -- --out problems
    def make_file(name: str):
        def setup(work: Path) -> None:
            (work / name).parent.mkdir(parents=True, exist_ok=True)
            (work / name).write_text("a user's file\n")
        return setup

    def user_dir(work: Path) -> None:
        (work / "out").mkdir(parents=True)
        (work / "out" / "thesis.tex").write_text("\\section{Results}\n")

    def copied(source: Path, target: str):
        def setup(work: Path) -> None:
            shutil.copytree(source, work / target) if source.is_dir() else (
                (work / target).parent.mkdir(parents=True, exist_ok=True), shutil.copy2(source, work / target))
        return setup

    def ro_dir(work: Path) -> None:
        make_read_only_dir(work / "ro")

    stage_runs = {"pretrain": run / "pretrain", "sft": run / "sft", "reward": run / "reward", "dpo": run / "dpo",
                  "ppo": run / "ppo"}
    for command in ("world", "tokenizer", "pretrain", "sft", "reward", "dpo", "ppo"):
        argv = base[command]
        add(command, "--out is a file", argv, make_file("out"))
        add(command, "--out is a user's directory", argv, user_dir)
        add(command, "--out is a user's directory, --force", argv + ["--force"], user_dir)
        add(command, "--out's parent is a file", replace(argv, "--out", f"{W}/afile/out"), make_file("afile"))
        add(command, f"--out in a read-only directory{READ_ONLY_NOTE()}", replace(argv, "--out", f"{W}/ro/out"),
            ro_dir)
        existing = {"world": run / "world", "tokenizer": run / "pretrain" / "tokenizer"}.get(command) or stage_runs[command]
        add(command, "--out holds a finished output, no --force", argv, copied(existing, "out"))
        if command in stage_runs:
            add(command, "--out holds another stage's run, --resume", argv + ["--resume"],
                copied(run / "world", "out"))
            add(command, "--resume and --force", argv + ["--resume", "--force"])
        add(command, "--out missing its value", argv[:argv.index("--out") + 1])
    add("label", "--out is a directory", base["label"], lambda w: (w / "out" / "prefs.jsonl").mkdir(parents=True))
    add("label", "--out exists, no --force", base["label"], copied(prefs, "out/prefs.jsonl"))
    add("label", "--out's summary exists, no --force", base["label"],
        copied(run / "label" / "prefs.summary.json", "out/prefs.summary.json"))
    add("label", "--out's parent is a file", replace(base["label"], "--out", f"{W}/afile/prefs.jsonl"),
        make_file("afile"))
    add("label", "--force and --resume", base["label"] + ["--force", "--resume"])
    for flag in ("--out", "--answers"):
        add("eval", f"{flag} exists, no --force", base["eval"] + [flag, f"{W}/x.json"], make_file("x.json"))
        add("eval", f"{flag} is a directory", base["eval"] + [flag, f"{W}/d"], lambda w: (w / "d").mkdir(parents=True))
        add("eval", f"{flag}'s parent is a file", base["eval"] + [flag, f"{W}/afile/x.json"], make_file("afile"))

    # -- command-specific bad arguments and wrong combinations
    add("world", "--preset unknown", base["world"][:-1] + ["huge"])
    add("world", "--seed not a number", base["world"] + ["--seed", "abc"])
    add("world", "no --out", ["world"])
    add("tokenizer", "--vocab-size 0", replace(base["tokenizer"], "--vocab-size", "0"))
    add("tokenizer", "--vocab-size -5", replace(base["tokenizer"], "--vocab-size", "-5"))
    add("tokenizer", "--vocab-size 100 (below bytes + specials)", replace(base["tokenizer"], "--vocab-size", "100"))
    add("tokenizer", "--vocab-size abc", replace(base["tokenizer"], "--vocab-size", "abc"))
    add("tokenizer", "--byte-level with --vocab-size", base["tokenizer"] + ["--byte-level"])
    add("tokenizer", "neither --vocab-size nor --byte-level", replace(base["tokenizer"], "--vocab-size", None))
    add("tokenizer", "no action", ["tokenizer"])
    add("tokenizer", "unknown action", ["tokenizer", "fit", "--data", str(world / "corpus.txt")])
    add("pretrain", "no --data", replace(base["pretrain"], "--data", None))
    add("sft", "no --init", replace(base["sft"], "--init", None))
    add("sft", "--scorer without --eval (ignored?)", base["sft"] + ["--scorer", "nosuchmodule:f"])
    add("ppo", "--reward and --scorer", base["ppo"] + ["--scorer", "teacher"])
    add("ppo", "neither --reward nor --scorer", replace(base["ppo"], "--reward", None))
    add("ppo", "--ptx without ptx_coef", base["ppo"] + ["--ptx", str(world / "corpus.txt")])
    add("dpo", "--reference is a reward model", base["dpo"] + ["--reference", reward])
    add("eval", "--scorer and --reward", base["eval"] + ["--scorer", "teacher", "--reward", reward])
    scorers = ["nosuchmodule:score", "json:nosuchfunction", "json", "math:pi", "json:dumps", "badscorer:short",
               "badscorer:nan", "badscorer:words", "badscorer:raises"]
    for scorer in scorers:
        add("eval", f"--scorer {scorer}", base["eval"] + ["--scorer", scorer])
        add("label", f"--scorer {scorer}", base["label"] + ["--scorer", scorer])
        add("ppo", f"--scorer {scorer}", replace(base["ppo"], "--reward", None) + ["--scorer", scorer])
    add("sft", "--scorer nosuchmodule:f with --eval", base["sft"] + ["--eval", str(world / "eval.jsonl"),
                                                                    "--scorer", "nosuchmodule:f"])
    add("dpo", "--scorer nosuchmodule:f with --eval", base["dpo"] + ["--eval", str(world / "eval.jsonl"),
                                                                    "--scorer", "nosuchmodule:f"])
    for flag, value in [("--max-new-tokens", "0"), ("--max-new-tokens", "-3"), ("--temperature", "-1"),
                        ("--temperature", "nan"), ("--top-k", "-1"), ("--top-p", "0"), ("--top-p", "1.5"),
                        ("--top-p", "nan"), ("--device", "foo"), ("--device", "cuda"), ("--seed", "x")]:
        for command in ("generate", "chat"):
            add(command, f"{flag} {value}", base[command] + [flag, value])
    add("generate", "--prompt empty", replace(base["generate"], "--prompt", ""))
    add("generate", "no --prompt", replace(base["generate"], "--prompt", None))
    add("chat", "--precision fp16", base["chat"] + ["--precision", "fp16"])
    for flag, value in [("--max-new-tokens", "0"), ("--batch-size", "0"), ("--temperature", "-1"),
                        ("--temperature", "nan"), ("--device", "foo"), ("--precision", "fp16")]:
        add("eval", f"{flag} {value}", base["eval"] + [flag, value])
    add("eval", "no --data", replace(base["eval"], "--data", None))
    for name, argv in [("--prompt empty", replace(base["score"], "--prompt", "")),
                       ("--response empty", replace(base["score"], "--response", "")),
                       ("--response whitespace", replace(base["score"], "--response", "  ")),
                       ("no --response", replace(base["score"], "--response", None)),
                       ("--device foo", base["score"] + ["--device", "foo"]),
                       ("--device cuda", base["score"] + ["--device", "cuda"]),
                       ("--prompt not UTF-8", replace(base["score"], "--prompt", "caf\udce9")),
                       ("a policy's run directory", with_positional(base["score"], sft))]:
        add("score", name, argv)

    # -- run: bad overrides and options (on a copy of the finished run, or a fresh --out)
    def run_copy(work: Path) -> None:
        shutil.copytree(run, work / "out")

    for value in ["foo.max_steps=1", "max_steps=1", "pretrain.max_steps", "pretrain.=1", "world.seed=3",
                  "pretrain.max_stepz=1", "pretrain.lr=nan", "pretrain.lr=-1", "pretrain.model.hidden_size=0",
                  "sft.batch_size=0", "dpo.loss=foo"]:
        add("run", f"override {value} (fresh --out)", base["run"] + [value])
    for value in ["pretrain.lr=nan", "dpo.beta=-1", "ppo.kl_coef=-1"]:
        add("run", f"override {value} (finished run)", base["run"] + [value], run_copy)
    for stage, value in [("sft", "sft.lr=nan"), ("label", "label.samples=1"), ("reward", "reward.margin=inf"),
                         ("dpo", "dpo.loss=foo"), ("ppo", "ppo.gamma=2"), ("ppo", "ppo.advantage=ppo")]:
        add("run", f"--from {stage} {value} (finished run)", base["run"] + ["--from", stage, value], run_copy)
    add("run", "--preset huge", replace(base["run"], "--preset", "huge"))
    add("run", "--from unknown", base["run"] + ["--from", "nosuch"])
    add("run", "--out is a file", base["run"], make_file("out"))
    add("run", "--out's parent is a file", replace(base["run"], "--out", f"{W}/afile/out"), make_file("afile"))
    add("run", "--out is a user's directory (pretrain.lr=nan stops it)", base["run"] + ["pretrain.lr=nan"], user_dir)
    add("run", "--out holds a stage run (not a pipeline)", base["run"] + ["pretrain.lr=nan"],
        copied(run / "sft", "out"))
    add("run", "--out's world damaged (world.json not JSON)", base["run"] + ["--from", "pretrain"],
        lambda w: (run_copy(w), (w / "out" / "world" / "world.json").write_text("{")))

    # -- report
    def damaged_run(change: Callable[[Path], None]):
        def setup(work: Path) -> None:
            shutil.copytree(run, work / "run")
            change(work / "run")
        return setup

    add("report", "DIR missing", ["report", f"{W}/nothing"])
    add("report", "DIR is a file", ["report", f"{W}/run"], make_file("run"))
    add("report", "DIR is empty", ["report", f"{W}/run"], lambda w: (w / "run").mkdir(parents=True))
    add("report", "DIR is a user's directory", ["report", f"{W}/out"], user_dir)
    add("report", "DIR is one stage's run", ["report", f"{W}/run"], copied(run / "sft", "run"))
    add("report", "a stage's summary.json not JSON", base["report"],
        damaged_run(lambda r: (r / "sft" / "summary.json").write_text("{")))
    add("report", "a stage's summary.json a list", base["report"],
        damaged_run(lambda r: (r / "sft" / "summary.json").write_text("[]")))
    add("report", "a stage's summary.json not UTF-8", base["report"],
        damaged_run(lambda r: (r / "dpo" / "summary.json").write_bytes(b'{"a": "\xff"}')))
    def bad_line_inside(path: Path) -> None:   # a line that is not JSON before the last good one
        lines = path.read_text().splitlines(keepends=True)
        path.write_text("".join(lines[:-1]) + '{"step": \n' + lines[-1])

    add("report", "metrics.jsonl with a bad line inside", base["report"],
        damaged_run(lambda r: bad_line_inside(r / "pretrain" / "metrics.jsonl")))
    # not bad input: a run killed while writing a line leaves it torn; the report is made without it
    add("report", "metrics.jsonl with a torn last line (a kill)", base["report"],
        damaged_run(lambda r: (r / "pretrain" / "metrics.jsonl").open("a").write('{"step": ')),
        note="torn last line")
    add("report", "timings.json not JSON", base["report"],
        damaged_run(lambda r: (r / "timings.json").write_text("{")))
    add("report", "machine.json a list", base["report"],
        damaged_run(lambda r: (r / "machine.json").write_text("[]")))
    add("report", "eval_answers.jsonl with a bad line inside", base["report"],
        damaged_run(lambda r: bad_line_inside(r / "ppo" / "eval_answers.jsonl")))
    add("report", "eval_answers.jsonl with a torn last line (a kill)", base["report"],
        damaged_run(lambda r: (r / "ppo" / "eval_answers.jsonl").open("a").write('{"prompt": ')),
        note="torn last line")
    add("report", "world.json not JSON", base["report"],
        damaged_run(lambda r: (r / "world" / "world.json").write_text("{")))
    add("report", "report.md is a directory", base["report"],
        damaged_run(lambda r: ((r / "report.md").unlink(), (r / "report.md").mkdir())))
    add("report", "--samples -1", base["report"] + ["--samples", "-1"], damaged_run(lambda r: None))
    add("report", "--samples x", base["report"] + ["--samples", "x"], damaged_run(lambda r: None))

    # -- no command / unknown command / unknown option
    add("run", "unknown option --outt", ["run", "--outt", out])
    for command in COMMANDS:
        if command not in ("run",):
            add(command, "unknown option --frobnicate", base[command] + ["--frobnicate"])
    return cases


SCORERS = '''
def short(prompts, responses):
    return [0.0]


def nan(prompts, responses):
    return [float("nan")] * len(responses)


def words(prompts, responses):
    return ["good"] * len(responses)


def raises(prompts, responses):
    raise RuntimeError("the scorer broke")
'''


# ---- running a case ----------------------------------------------------------------------------

def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under root: files by (size, mtime), directories as present."""
    seen: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        seen[rel] = ("dir",)
        for name in filenames:
            p = os.path.join(dirpath, name)
            try:
                st = os.lstat(p)
            except FileNotFoundError:
                continue
            seen[os.path.relpath(p, root)] = (st.st_size, st.st_mtime_ns)
    return seen


def compare(before: dict, after: dict) -> tuple[list[str], list[str]]:
    damaged = [p for p, v in before.items() if p not in after or (v != ("dir",) and after[p] != v)]
    added = [p for p in after if p not in before]
    return sorted(damaged), sorted(added)


def count_lines(command: str, stderr: str) -> int:
    """Non-empty lines of stderr; for `run`, whose stderr carries each stage's progress and notes,
    its error lines (": error:") only."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    if command == "run":
        lines = [line for line in lines if ": error:" in line]
    return len(lines)


class Timeout(Exception):
    pass


def run_in_process(case: Case, work: Path, tmp: Path) -> Result:
    import torch

    from lmschool.cli import main

    argv = case.resolved(work)
    env, cwd, threads = dict(os.environ), os.getcwd(), torch.get_num_threads()
    out, err = io.StringIO(), io.StringIO()
    stdin = sys.stdin
    status, exception = None, ""

    def alarm(*_):
        raise Timeout(f"over {CASE_SECONDS}s")

    signal.signal(signal.SIGALRM, alarm)
    signal.alarm(CASE_SECONDS)
    t0 = time.time()
    try:
        os.chdir(tmp)
        sys.stdin = io.StringIO(case.stdin)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                status = main(argv)
            except SystemExit as e:
                status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                if isinstance(e.code, str):
                    print(e.code, file=sys.stderr)
            except BaseException as e:  # noqa: BLE001 - what escaped main() is the finding
                exception = f"{type(e).__name__}: {str(e)[:150]}"
                traceback.print_exc(file=sys.stderr)
    finally:
        signal.alarm(0)
        sys.stdin = stdin
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(env)
        torch.set_num_threads(threads)
    stderr = err.getvalue()
    return Result(case, status, stderr, exception=exception, lines=count_lines(case.command, stderr),
                  traceback=bool(exception) or "Traceback (most recent call last)" in stderr,
                  seconds=time.time() - t0)


def read_only_mount_works() -> bool:
    """Whether this process can mount a read-only tmpfs: root writes into a chmod 0o555 directory
    anyway, but not into a read-only file system, so as root the read-only cases use one."""
    if not hasattr(read_only_mount_works, "answer"):
        answer = False
        if os.geteuid() == 0 and shutil.which("mount"):
            probe = Path(tempfile.mkdtemp(prefix="ro-probe-"))
            try:
                answer = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(probe)],
                                        capture_output=True).returncode == 0
                if answer:
                    answer = not os.access(probe, os.W_OK)
                    subprocess.run(["umount", str(probe)], capture_output=True)
            finally:
                probe.rmdir() if not os.path.ismount(probe) else None
        read_only_mount_works.answer = answer
    return read_only_mount_works.answer


def READ_ONLY_NOTE() -> str:   # noqa: N802  (a case description's tail)
    return " (root writes anyway)" if os.geteuid() == 0 and not read_only_mount_works() else ""


def make_read_only_dir(path: Path) -> None:
    """A directory nobody may write into: a read-only tmpfs as root (where it can be mounted), else
    chmod 0o555."""
    path.mkdir(parents=True)
    if os.geteuid() == 0 and read_only_mount_works():
        subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(path)], check=True,
                       capture_output=True)
    else:
        path.chmod(0o555)


def release_read_only_dir(work: Path) -> None:
    """Undo make_read_only_dir in a case's directory (before it is removed)."""
    ro = work / "ro"
    if os.path.ismount(ro):
        subprocess.run(["umount", str(ro)], capture_output=True)
    if ro.exists():
        ro.chmod(0o755)


def run_subprocess(case: Case, work: Path, tmp: Path, scorers: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{scorers}", "PYTHONDONTWRITEBYTECODE": "1"}
    argv = [a.encode("utf-8", "surrogateescape") for a in case.resolved(work)]
    try:
        proc = subprocess.run([sys.executable.encode(), b"-m", b"lmschool", *argv], cwd=tmp, env=env,
                              input=case.stdin.encode(), capture_output=True, timeout=CASE_SECONDS)
        stderr = proc.stderr.decode("utf-8", "replace")
        status = proc.returncode
    except subprocess.TimeoutExpired:
        stderr, status = "timeout", None
    return {"status": status, "lines": count_lines(case.command, stderr),
            "traceback": "Traceback (most recent call last)" in stderr, "stderr": stderr}


def run_case(i: int, case: Case, tmp: Path, scorers: Path) -> Result:
    work = tmp / "cases" / f"{i:03d}"
    work.mkdir(parents=True)
    if case.setup:
        case.setup(work)
    before = snapshot(tmp)
    result = run_in_process(case, work, tmp)
    damaged, added = compare(before, snapshot(tmp))
    if result.status == 0:   # what a command that succeeded was meant to rewrite is not damage
        mine = tuple(os.path.relpath(p.replace("{W}", str(work)), tmp) for p in case.output)
        damaged = [p for p in damaged if not p.startswith(mine)] if mine else damaged
    result.damaged = damaged
    if result.status != 0:
        result.wrote = added
    if case.subprocess:
        sub = tmp / "cases" / f"{i:03d}-sub"
        sub.mkdir()
        if case.setup:
            case.setup(sub)
        result.sub = run_subprocess(case, sub, tmp, scorers)
        first = (result.stderr.strip().splitlines() or [""])[-1].replace(str(work), "W")
        sub_first = (result.sub["stderr"].strip().splitlines() or [""])[-1].replace(str(sub), "W")
        result.sub["same"] = result.sub["traceback"] == result.traceback and (result.traceback or (
            result.sub["status"] == result.status and result.sub["lines"] == result.lines and first == sub_first))
        release_read_only_dir(sub)
        shutil.rmtree(sub, ignore_errors=True)
    release_read_only_dir(work)
    shutil.rmtree(work, ignore_errors=True)  # the case's own directory: what it wrote is judged already
    return result


def pick_subprocess_sample(cases: list[Case], per_command: int = 2) -> None:
    by_command: dict[str, list[Case]] = {}
    for case in cases:
        by_command.setdefault(case.command, []).append(case)
    for group in by_command.values():
        step = max(len(group) // per_command, 1)
        for case in group[::step][:per_command]:
            case.subprocess = True


# ---- the table ---------------------------------------------------------------------------------

COLUMNS = ["cases", "clean", "traceback", "not one line", "exit not 2", "accepted", "damaged", "wrote"]


def table(results: list[Result]) -> list[list]:
    rows = []
    for command in COMMANDS + ["all"]:
        rs = [r for r in results if command in ("all", r.case.command)]
        if not rs:
            continue
        rows.append([command, len(rs), sum(r.clean for r in rs), sum(r.traceback for r in rs),
                     sum(r.not_one_line for r in rs), sum(r.exit_not_2 for r in rs), sum(r.accepted for r in rs),
                     sum(bool(r.damaged) for r in rs), sum(bool(r.wrote) for r in rs)])
    return rows


def print_report(results: list[Result], markdown: bool, seconds: float) -> None:
    rows = table(results)
    sample = [r for r in results if r.sub is not None]
    if markdown:
        print("| command | " + " | ".join(COLUMNS) + " |")
        print("|---|" + "---:|" * len(COLUMNS))
        for row in rows:
            print("| " + " | ".join(str(x) for x in row) + " |")
    else:
        print(f"{'command':<10}" + "".join(f"{c:>13}" for c in COLUMNS))
        for row in rows:
            print(f"{row[0]:<10}" + "".join(f"{x:>13}" for x in row[1:]))
    print(f"\n{len(results)} cases in {seconds:.0f}s; {len(sample)} also run as a subprocess, "
          f"{sum(r.sub['same'] for r in sample)} of them alike in-process and out")
    for r in sample:
        if not r.sub["same"]:
            print(f"- differs as a subprocess: {r.case.command} / {r.case.name}: in-process exit {r.status}, "
                  f"{r.lines} lines; subprocess exit {r.sub['status']}, {r.sub['lines']} lines: "
                  f"{r.sub['stderr'].strip()[-200:]!r}")
    bad = [r for r in results if not r.clean]
    if bad:
        print(f"\n{len(bad)} cases not clean:")
        for r in bad:
            last = (r.stderr.strip().splitlines() or [""])[-1][:160]
            print(f"- {r.case.command} / {r.case.name}: {r.why()}" + (f" — `{last}`" if last and markdown else
                                                                       f" -- {last}" if last else ""))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--markdown", action="store_true", help="print the table as markdown")
    parser.add_argument("--only", help="comma-separated commands to run the cases of")
    parser.add_argument("--match", help='only the cases whose "command / description" holds this text')
    parser.add_argument("--base", type=Path, help="a finished `lmschool run --preset tiny` to copy instead of running one")
    parser.add_argument("--json", type=Path, help="also write every case's result here")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()
    sys.dont_write_bytecode = True
    tmp = Path(tempfile.mkdtemp(prefix="lmschool-bad-inputs-"))
    try:
        t0 = time.time()
        run = build_base(tmp, args.base)
        scorers = tmp / "scorers"
        scorers.mkdir()
        (scorers / "badscorer.py").write_text(SCORERS)
        sys.path.insert(0, str(scorers))
        files, ckpts = make_files(tmp, run), make_checkpoints(tmp, run)
        cases = cases_for(tmp, run, files, ckpts)
        if args.only:
            wanted = set(args.only.split(","))
            cases = [c for c in cases if c.command in wanted]
        if args.match:
            cases = [c for c in cases if args.match in f"{c.command} / {c.name}"]
        pick_subprocess_sample(cases)
        results = []
        for i, case in enumerate(cases):
            results.append(run_case(i, case, tmp, scorers))
            r = results[-1]
            print(f"[{i + 1}/{len(cases)}] {case.command} / {case.name}: "
                  f"{'clean' if r.clean else r.why()} ({r.seconds:.1f}s)", file=sys.stderr, flush=True)
        if args.json:
            args.json.write_text(json.dumps([{"command": r.case.command, "name": r.case.name, "status": r.status,
                                              "lines": r.lines, "traceback": r.traceback, "clean": r.clean,
                                              "why": r.why(), "stderr": r.stderr[-2000:], "sub": r.sub}
                                             for r in results], indent=1))
        print_report(results, args.markdown, time.time() - t0)
        return 0
    finally:
        if args.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
