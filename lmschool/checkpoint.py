"""Checkpoints: Hugging Face model directories, written atomically, plus resume state beside them.

A model directory holds `config.json`, `model.safetensors`, the tokenizer files and
`generation_config.json`; `transformers` loads it as it is. A run directory looks like:

    RUN/config.yaml              the resolved config
    RUN/metrics.jsonl            one JSON object per logged step
    RUN/summary.json             final figures
    RUN/model/                   the final model (an HF directory)
    RUN/checkpoints/step-000200/ an HF directory + `trainer_state.pt` (optimizer, schedule, RNG,
                                 step); the last `keep_last` are kept

Every directory is written under a temporary name and renamed into place, so a crash never
leaves a half-written checkpoint, and holds a `manifest.json` written last (each file's size and
SHA-256): a checkpoint proves itself. `checkpoint_problem` says why one cannot be trusted (a file
missing, truncated or changed, unreadable or non-finite weights); resume takes the newest
checkpoint without a problem and says which it skipped; loading a damaged model is one clear
error. Weights that are not finite are never written as a checkpoint. Loads are safetensors, and
`torch.load(weights_only=True)` for resume state: no pickled code from a file is ever executed.

A model with LoRA adapters (lmschool/adapters.py) is written as a PEFT adapter directory instead:
`adapter_config.json` + `adapter_model.safetensors` (peft loads it onto its base), the tokenizer,
`generation_config.json` and `lmschool_config.json` (the config.json the merged model has; no
config.json, or transformers would look for full weights there). `load_model` of such a directory
loads its base (base_model_name_or_path), applies the adapter and merges it: a LoRA run is usable
wherever a checkpoint is, as the plain model it stands for.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lmschool import adapters
from lmschool.errors import UserError
from lmschool.files import atomic_dir, ordinary_file
from lmschool.hf import from_hf_config, to_hf_config
from lmschool.model import Transformer, init_weights

STATE_FILE = "trainer_state.pt"
MANIFEST = "manifest.json"


def write_model(directory: str | Path, model: Transformer, tokenizer=None, extra: dict | None = None,
                at: Path | None = None) -> None:
    """Write the HF files of `model` (and its tokenizer) into an existing directory, which will be
    at `at` (an atomic write's final place): an adapter records its base relative to it too."""
    directory = Path(directory)
    weights = "model.safetensors"
    if adapters.has_adapters(model):
        adapters.save_adapter(directory, model)
        weights = adapters.ADAPTER_WEIGHTS
    else:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict_for_save().items()}
        save_file(tensors, str(directory / weights), metadata={"format": "pt"})
    ordinary_file(directory / weights)   # safetensors writes it 0600: readable like its neighbours
    ids, stop = {}, []
    if tokenizer is not None:
        tokenizer.save(directory)
        stop = list(tokenizer.stop_ids)
        ids = dict(bos_token_id=None, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    cfg = to_hf_config(model.config, model.head, extra=extra, **ids)
    config_name = "config.json"
    if adapters.has_adapters(model):
        config_name = adapters.LMSCHOOL_CONFIG
        if at is not None:   # the base found again after a move of the runs that holds both
            cfg[adapters.RELATIVE_BASE] = os.path.relpath(Path(model.adapter_spec.base).resolve(), Path(at).resolve())
    (directory / config_name).write_text(json.dumps(cfg, indent=2) + "\n")
    if model.head == "lm":
        gen = {"_from_model_config": False, "do_sample": False}
        if tokenizer is not None:
            gen.update(eos_token_id=stop, pad_token_id=tokenizer.pad_id)
        (directory / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


def save_model(path: str | Path, model: Transformer, tokenizer=None, extra: dict | None = None) -> Path:
    """Atomically write an HF model directory at `path` (its manifest last)."""
    check_finite(model, Path(path))
    with atomic_dir(path) as tmp:
        write_model(tmp, model, tokenizer, extra, at=Path(path))
        write_manifest(tmp)
    return Path(path)


# ---- checkpoints that prove themselves --------------------------------------------------------------

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(directory: Path) -> None:
    """directory/manifest.json: the size and SHA-256 of every other file in it, written last."""
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {p.relative_to(directory).as_posix(): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
               for p in files}
    (directory / MANIFEST).write_text(json.dumps({"files": entries}, indent=1) + "\n")


def manifest_problem(directory: Path) -> str | None:
    """What in `directory` differs from its manifest (a file missing, of another size or checksum),
    or None; None too for a directory written before manifests (nothing to check against)."""
    path = directory / MANIFEST
    if not path.is_file():
        return None
    try:
        entries = json.loads(path.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"its {MANIFEST} is unreadable"
    for name, entry in entries.items():
        file = directory / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != entry.get("bytes"):
            return f"{name} has {file.stat().st_size} bytes where {entry.get('bytes')} were written"
        try:
            if _sha256(file) != entry.get("sha256"):
                return f"{name} is not the file that was written (its checksum differs)"
        except OSError as e:   # e.g. no permission to read it
            return f"{name} cannot be read ({e.strerror or e})"
    return None


def checkpoint_problem(directory: Path) -> str | None:
    """Why a training checkpoint cannot be resumed from, or None: its manifest, its files, and
    weights that read and are finite."""
    problem = manifest_problem(directory)
    if problem:
        return problem
    weights = weights_file(directory)
    for name in (config_file(directory).name, weights.name, STATE_FILE):
        if not (directory / name).is_file():
            return f"{name} is missing"
    try:
        tensors = load_file(str(weights))
    except Exception as e:   # safetensors raises its own error types for a damaged file
        return f"{weights.name} cannot be read ({str(e)[:80]})"
    bad = next((k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad:
        return f"its weights are not finite ({bad})"
    try:
        load_training_state(directory)
    except Exception as e:   # a damaged pickle-free state file: zip or tensor errors of any type
        return f"{STATE_FILE} cannot be read ({str(e)[:80]})"
    return None


def check_finite(model: torch.nn.Module, where: Path) -> None:
    """Refuse to write weights that are not finite: they would pass for a good checkpoint."""
    bad = next((n for n, p in model.named_parameters() if not torch.isfinite(p).all()), None)
    if bad is not None:
        raise UserError(f"{where}: not written, the weights are not finite ({bad}); the run diverged. "
                        "Try a lower lr or grad_clip")


def config_file(path: Path) -> Path:
    """A model directory's config.json, or an adapter directory's lmschool_config.json."""
    return path / (adapters.LMSCHOOL_CONFIG if adapters.is_adapter_dir(path) else "config.json")


def weights_file(path: Path) -> Path:
    """A model directory's model.safetensors, or an adapter directory's adapter_model.safetensors."""
    return path / (adapters.ADAPTER_WEIGHTS if adapters.is_adapter_dir(path) else "model.safetensors")


def is_model_dir(path: Path) -> bool:
    """Whether `path` holds a model: full weights' config.json, or a LoRA adapter."""
    return (path / "config.json").is_file() or (path / adapters.ADAPTER_CONFIG).is_file()


def resolve(path: str | Path) -> Path:
    """A model directory from a path that is one, or a run directory (its final or latest model)."""
    path = Path(path)
    if is_model_dir(path):
        return path
    if is_model_dir(path / "model"):
        return path / "model"
    latest = latest_checkpoint(path)
    if latest is not None:
        return latest
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist")
    raise UserError(f"{path} is neither a model directory (no config.json) nor a run directory "
                    f"with a model/ or checkpoints/ inside")


def read_config(path: str | Path) -> dict:
    path = resolve(path)
    file = config_file(path)
    if not file.is_file():   # a PEFT adapter written by another tool: the config is its base's
        return read_config(adapters.adapter_base(path, adapters.read_adapter_config(path)))
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{file} is not valid JSON: {e}") from None
    if not isinstance(config, dict):   # every reader calls .get on it
        raise UserError(f"{file} holds a JSON {type(config).__name__}, not an object of "
                        "model settings; restore the checkpoint's config.json")
    return config


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    single = path / "model.safetensors"
    index = path / "model.safetensors.index.json"
    if single.is_file():
        try:
            return load_file(str(single))
        except Exception as e:   # safetensors raises its own error types for a damaged file
            raise UserError(f"{single} cannot be read ({str(e)[:80]}); the file is damaged: use another "
                            "checkpoint of the run, or train again") from None
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        tensors: dict[str, torch.Tensor] = {}
        for shard in shards:
            tensors.update(load_file(str(path / shard)))
        return tensors
    if any(path.glob("*.bin")) or any(path.glob("*.pt")):
        raise UserError(f"{path}: only safetensors weights are loaded (pickle files can run code); "
                        f"convert with transformers: model.save_pretrained(dir, safe_serialization=True)")
    raise UserError(f"{path}: no model.safetensors found")


def load_model(path: str | Path, head: str | None = None, *, new_head: bool = False,
               device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               ) -> Transformer:
    """Load an HF Llama/Qwen2 directory (ours or Hugging Face's) as a Transformer.

    head: the head wanted ('lm' for policies, 'score' for reward models/critics); None = as saved.
    new_head: allow a different head than saved (e.g. a reward model from an SFT checkpoint);
    the backbone is loaded and the new head initialised by `init_weights`.
    """
    path = resolve(path)
    problem = manifest_problem(path)
    if problem:
        raise UserError(f"{path} is damaged: {problem}; use another checkpoint of the run, or train again")
    if adapters.is_adapter_dir(path):
        return load_adapter_model(path, head, new_head=new_head, device=device, dtype=dtype)
    cfg, saved_head = from_hf_config(read_config(path), str(path / "config.json"))
    head = head or saved_head
    if head != saved_head and not new_head:
        kinds = {"lm": "a policy (ForCausalLM)", "score": "a reward model (ForSequenceClassification)"}
        raise UserError(f"{path} is {kinds[saved_head]}, but {kinds[head]} is expected here")
    tensors = _read_tensors(path)
    model = Transformer(cfg, head)
    if head != saved_head:
        init_weights(model, seed=0)
        tensors = {k: v for k, v in tensors.items() if k.startswith("model.")}
    expected = model.state_dict()
    if head == "lm" and cfg.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    missing = [k for k in expected if k not in tensors and k.startswith("model.")]
    missing += [k for k in ("lm_head.weight", "score.weight") if k in expected and k not in tensors
                and head == saved_head and not (k == "lm_head.weight" and cfg.tie_word_embeddings)]
    unexpected = [k for k in tensors if k not in expected and "rotary_emb" not in k]
    if missing or unexpected:
        raise UserError(f"{path}/model.safetensors does not match its config.json: "
                        f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                        f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    for k, v in tensors.items():
        if k in expected and expected[k].shape != v.shape:
            raise UserError(f"{path}: tensor {k} has shape {tuple(v.shape)}, config says "
                            f"{tuple(expected[k].shape)}")
    bad = next((k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:   # NaN weights answer NaN scores and empty answers, with exit 0
        raise UserError(f"{path}: its weights are not finite ({bad}); the run that wrote it diverged: "
                        "use an earlier checkpoint of it")
    model.load_state_dict({k: v for k, v in tensors.items() if k in expected}, strict=False)
    return model.to(device=device, dtype=dtype)


def load_adapter_model(path: Path, head: str | None = None, *, new_head: bool = False, merge: bool = True,
                       base: Path | None = None, device: str | torch.device = "cpu",
                       dtype: torch.dtype = torch.float32) -> Transformer:
    """A LoRA adapter directory as a model: its base (`base`, default its base_model_name_or_path)
    with the adapter applied, merged into the weights (`merge`) or kept as adapters."""
    adapter = adapters.read_adapter_config(path)
    base = base or adapters.adapter_base(path, adapter)
    if adapters.is_adapter_dir(resolve(base)):
        raise UserError(f"{path}: its base {base} is a LoRA adapter itself; lmschool applies one adapter onto "
                        "a full checkpoint: merge the base first (`lmschool merge`) and point the adapter at it")
    _, saved_head = from_hf_config(read_config(path), str(config_file(path)))
    head = head or saved_head
    if head != saved_head and not new_head:
        kinds = {"lm": "a policy (ForCausalLM)", "score": "a reward model (ForSequenceClassification)"}
        raise UserError(f"{path} is {kinds[saved_head]}, but {kinds[head]} is expected here")
    model = load_model(base, head=saved_head, new_head=True)
    lora = adapters.lora_config_of(adapter)
    saved = tuple(adapter.get("modules_to_save") or ())
    adapters.add_lora(model, lora, base=str(base), modules_to_save=tuple(m for m in saved if hasattr(model, m)))
    weights = path / adapters.ADAPTER_WEIGHTS
    try:
        tensors = load_file(str(weights))
    except Exception as e:   # safetensors raises its own error types for a damaged file
        raise UserError(f"{weights} cannot be read ({str(e)[:80]}); the file is damaged: use another "
                        "checkpoint of the run, or train again") from None
    bad = next((k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:
        raise UserError(f"{path}: its weights are not finite ({bad}); the run that wrote it diverged: "
                        "use an earlier checkpoint of it")
    adapters.load_adapter_state(model, tensors, str(weights))
    if merge:
        adapters.merge_adapters(model)
    if head != saved_head:   # e.g. a critic from a LoRA policy: its backbone, a new head
        fresh = Transformer(model.config, head)
        init_weights(fresh, seed=0)
        fresh.load_state_dict({k: v for k, v in model.state_dict().items() if k.startswith("model.")},
                              strict=False)
        model = fresh
    return model.to(device=device, dtype=dtype)


def model_extra(path: str | Path) -> dict:
    """The `lmschool` section of a checkpoint's config.json (stage, reward bias, ...)."""
    return read_config(path).get("lmschool", {}) or {}


# ---- run directories and resume state -------------------------------------------------------

def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith("step-") and (p / STATE_FILE).is_file())


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest checkpoint of a run that has no problem (see checkpoint_problem); each newer one
    skipped is said in one line on stderr."""
    for directory in reversed(checkpoint_dirs(run_dir)):
        problem = checkpoint_problem(directory)
        if problem is None:
            return directory
        print(f"lmschool: skipped checkpoint {directory}: {problem}", file=sys.stderr)
    return None


def save_training_checkpoint(run_dir: str | Path, step: int, model: Transformer, state: dict,
                             tokenizer=None, extra: dict | None = None, keep_last: int = 2) -> Path:
    """Write RUN/checkpoints/step-N (model + trainer_state.pt) atomically; prune to `keep_last`."""
    path = Path(run_dir) / "checkpoints" / f"step-{step:08d}"
    check_finite(model, path)
    with atomic_dir(path) as tmp:
        write_model(tmp, model, tokenizer, extra, at=path)
        torch.save(state, tmp / STATE_FILE)
        write_manifest(tmp)
    for old in checkpoint_dirs(run_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return path


def load_training_state(ckpt_dir: str | Path) -> dict:
    return torch.load(Path(ckpt_dir) / STATE_FILE, map_location="cpu", weights_only=True)


# ---- checkpoint kinds: a policy or a reward model --------------------------------------------------

KINDS = {"policy": "a policy (a language model with the LM head: pre-training, SFT, DPO or PPO)",
         "reward": "a reward model (a scalar head: `lmschool reward`)"}


def checkpoint_kind(path: str | Path) -> str:
    """'reward' for a reward model (config.json "lmschool" kind "reward", or a sequence classifier
    of another origin), else 'policy'."""
    config = read_config(path)
    kind = (config.get("lmschool") or {}).get("kind")
    if kind in KINDS:
        return kind
    archs = config.get("architectures") or []
    return "reward" if any("SequenceClassification" in a for a in archs) else "policy"


def check_kind(path: str | Path, expected: str, what: str = "this command") -> None:
    """Raise a UserError unless the checkpoint at `path` is of kind `expected` ('policy' or
    'reward'); `what` names the argument in the message (e.g. "--init")."""
    if expected not in KINDS:
        raise ValueError(f"expected must be one of {sorted(KINDS)}, not {expected!r}")
    kind = checkpoint_kind(path)
    if kind != expected:
        hint = ("pass the SFT (or later) policy run instead" if expected == "policy"
                else "train one with `lmschool reward --init SFT_RUN --data prefs.jsonl --out DIR`")
        raise UserError(f"{resolve(path)} is {KINDS[kind]}, but {what} needs {KINDS[expected]}; {hint}")
