"""What `lmschool serve CKPT [CKPT ...]` serves: each CKPT as a model id, the school world that
judges their answers, and a pipeline run's report.

- A CKPT is a model directory or a run directory (`checkpoint.resolve`: its final or latest
  model); its id is the run's name (`runs/sft` -> "sft", `runs/sft/model` -> "sft",
  `runs/ppo/checkpoints/step-00000040` -> "ppo/step-00000040"). `NAME=PATH` names it yourself.
- A pipeline run (`lmschool run --out runs/demo`) serves every policy it trained, under its
  stage's name ("pretrain", "sft", "dpo", "ppo", "sweep/dpo-beta0.3" ...), skipping the reward
  model, and its report (report.md and plots/) at /report.
- The world: the `world.json` of the run's `world/` directory (or beside the checkpoint, or
  `--world`); with it the compare view shows the teacher's score of every answer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from lmschool.errors import UserError


@dataclass
class Spec:
    """A model to serve, before it is loaded."""

    id: str
    path: Path                          # the model directory
    run: Path                           # the directory it was given as (or the pipeline stage's)
    stage: str | None = None            # the pipeline stage that trained it, when known


@dataclass
class ServedModel:
    id: str
    path: Path
    model: object                       # lmschool.model.Transformer, in eval mode
    tokenizer: object                   # lmschool.tokenizer.Tokenizer
    context: int                        # max_position_embeddings
    created: int                        # the checkpoint's mtime (OpenAI's `created`)
    stage: str | None
    world: Path | None                  # world.json of its school world, if known

    def info(self) -> dict:
        return {"id": self.id, "path": str(self.path), "stage": self.stage, "context": self.context,
                "chat": self.tokenizer.has_chat_tokens, "world": self.world is not None,
                "parameters": self.model.config.num_params()}


def is_pipeline_run(path: Path) -> bool:
    """A directory `lmschool run` wrote: its machine.json or report, and stage directories."""
    from lmschool.pipeline import NAMES

    return path.is_dir() and any((path / f).is_file() for f in ("machine.json", "report.json", "report.md")) \
        and any((path / name).is_dir() for name in NAMES)


def run_name(given: Path, model_dir: Path) -> str:
    """The id of a checkpoint given as `given` that resolved to `model_dir` (see the module doc)."""
    given = Path(os.path.abspath(given))
    if model_dir.parent.name == "checkpoints":
        return f"{model_dir.parent.parent.name}/{model_dir.name}"
    return given.parent.name if given.name == "model" else given.name


def find(items: list[str]) -> tuple[list[Spec], Path | None]:
    """The models to serve from the command line's CKPT arguments, and the first pipeline run's
    directory (whose report is served), or None. Ids must be unique."""
    from lmschool.checkpoint import checkpoint_kind, resolve
    from lmschool.pipeline import STAGES, sweep_stages

    specs: list[Spec] = []
    report_run = None
    for item in items:
        name, path = None, Path(item)
        if "=" in item and not path.exists():
            name, _, rest = item.partition("=")
            path = Path(rest)
            if not name:
                raise UserError(f"{item!r}: NAME=PATH needs a name before '='")
        if is_pipeline_run(path):
            if name is not None:
                raise UserError(f"{item!r}: a pipeline run serves each of its stages under the stage's name; "
                                "give it without NAME=")
            found = []
            for stage in [*STAGES, *sweep_stages()]:
                directory = path / stage.name
                if stage.kind in ("training", "policy") and directory.is_dir():
                    try:
                        model_dir = resolve(directory)
                    except UserError:
                        continue           # a stage that has not written its model yet
                    if checkpoint_kind(model_dir) == "policy":
                        found.append(Spec(stage.name, model_dir, directory, stage.name))
            if not found:
                raise UserError(f"{path}: this pipeline run has no trained model yet; wait for its "
                                "pre-training to finish, or serve a checkpoint directory")
            specs += found
            report_run = report_run or path
            continue
        model_dir = resolve(path)
        if checkpoint_kind(model_dir) != "policy":
            raise UserError(f"{model_dir} is a reward model (a scalar head); it scores answers but does "
                            "not write them: serve a policy (pre-training, SFT, DPO, PPO ...)")
        stage = _stage_of(model_dir)
        specs.append(Spec(name or run_name(path, model_dir), model_dir, path, stage))
    seen: dict[str, Path] = {}
    for spec in specs:
        if spec.id in seen:
            raise UserError(f"two checkpoints would both be served as {spec.id!r} ({seen[spec.id]} and "
                            f"{spec.path}); name them yourself with NAME=PATH, e.g. {spec.id}-2={spec.run}")
        seen[spec.id] = spec.path
    return specs, report_run


def _stage_of(model_dir: Path) -> str | None:
    from lmschool.checkpoint import model_extra

    return model_extra(model_dir).get("stage")


def world_of(spec: Spec, given: Path | None = None) -> Path | None:
    """The world.json that judges this model's answers: `given` (--world: a world.json or its
    directory), else a `world/` directory beside the run or its pipeline run, else a world.json
    beside the checkpoint or its run; None when none is found."""
    if given is not None:
        found = given / "world.json" if given.is_dir() else given
        if not found.is_file():
            raise UserError(f"--world {given}: no world.json there; give the world directory "
                            "`lmschool world` wrote (or its world.json)")
        return found
    run = Path(os.path.abspath(spec.run))
    for directory in [spec.path, run, *run.parents[:2]]:
        for candidate in (directory / "world.json", directory / "world" / "world.json"):
            if candidate.is_file():
                return candidate
    return None


def load(specs: list[Spec], device, world: Path | None = None) -> dict[str, ServedModel]:
    """Load every model (LM head, eval mode) and its tokenizer."""
    from lmschool.checkpoint import load_model
    from lmschool.tokenizer import Tokenizer

    served = {}
    for spec in specs:
        tokenizer = Tokenizer.load(spec.path)
        model = load_model(spec.path, head="lm", device=device).eval()
        created = int((spec.path / "config.json").stat().st_mtime)
        served[spec.id] = ServedModel(spec.id, spec.path, model, tokenizer, model.config.max_position_embeddings,
                                      created, spec.stage, world_of(spec, world))
    return served


class Teachers:
    """The school world's teacher of each world.json, read once (for the compare view's scores)."""

    def __init__(self):
        self.by_path: dict[Path, object] = {}

    def score(self, world: Path, messages: list[dict], responses: list[str]) -> list[dict]:
        from lmschool.world.teacher import Teacher

        if world not in self.by_path:
            self.by_path[world] = Teacher.from_file(world)
        teacher = self.by_path[world]
        scores = teacher.scores(messages, responses)
        return [{"score": s.total, "parts": s.parts, "flaws": teacher.flaws(messages, r)}
                for s, r in zip(scores, responses)]
