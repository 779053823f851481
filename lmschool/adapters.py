"""LoRA (Hu et al. 2021): low-rank adapters on the model's projections, in the PEFT format.

    model = add_lora(load_model(init), LoraConfig(r=16, alpha=32), base=init, seed=0)
    ...train: only lora_A / lora_B (and `modules_to_save`, e.g. a reward model's `score`) learn...
    save_adapter(directory, model)            # adapter_config.json + adapter_model.safetensors
    with adapters_disabled(model): ...        # the base model, e.g. DPO's / PPO's reference
    merge_adapters(model)                     # W <- W + (alpha / r) B A: a plain Transformer again

Design choices:
- A targeted `nn.Linear` becomes a `LoRALinear`: the same module with the same `weight` and `bias`
  parameters (so every base parameter keeps its Hugging Face name) plus `lora_A` (r, in) and
  `lora_B` (out, r): y = x W^T + b + (alpha / r) * B A dropout(x), as PEFT computes it. A starts
  as PEFT's kaiming-uniform (bound 1 / sqrt(in)), B as zeros, so the wrapped model computes
  exactly the base model's outputs until the first step.
- Only adapter weights train: every base parameter is frozen (no gradient, no AdamW state: the
  memory LoRA saves), except the modules named in `modules_to_save` (the scalar `score` head of a
  reward model or critic, as PEFT does for sequence classification).
- Switching the adapters off (`adapters_disabled`, `WithoutAdapters`) runs every LoRALinear as its
  plain base layer: the same operations as the base model, so the reference log-probs of DPO and
  PPO are the base's exactly, without a second copy of the weights.
- Saved in PEFT's format: `adapter_config.json` (peft_type LORA, r, lora_alpha, target_modules,
  task_type, modules_to_save, base_model_name_or_path) and `adapter_model.safetensors` with PEFT's
  key names (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`,
  `base_model.model.score.weight`), so `PeftModel.from_pretrained(hf_base, DIR)` (and
  `AutoModelForCausalLM.from_pretrained(DIR)`, with peft installed) loads it. lmschool writes no
  config.json there (transformers would look for full weights beside it); the config.json the
  merged model would have goes to `lmschool_config.json`. The package itself does not use peft.

Shapes: r rank, I in_features, O out_features.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmschool.config import check
from lmschool.errors import UserError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
LMSCHOOL_CONFIG = "lmschool_config.json"
RELATIVE_BASE = "lmschool_base_relative"   # in LMSCHOOL_CONFIG: the base's path from the adapter's directory
"""In an adapter directory: the config.json the merged model has (family, shape, lmschool section)."""
PREFIX = "base_model.model."   # PEFT's prefix of every key: PeftModel -> LoraModel -> the HF model
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoraConfig:
    """LoRA adapters (Hu et al. 2021): r = 0 trains every weight; r > 0 trains only low-rank adapters."""

    r: int = 0
    """Rank of the adapters (0 = off: full fine-tuning). 8-64 is usual."""
    alpha: float = 16.0
    """Scale: the update is (alpha / r) B A (PEFT's lora_alpha)."""
    dropout: float = 0.0
    """Dropout on the adapters' input (PEFT's lora_dropout)."""
    targets: list[str] = field(default_factory=lambda: list(PROJECTIONS))
    """Projections that get adapters: any of q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj
    (default: all seven, which QLoRA found needed to match full fine-tuning)."""

    def __post_init__(self):
        check(self.r >= 0, "lora.r", "must be >= 0 (0 = off)")
        check(self.alpha > 0, "lora.alpha", "must be positive")
        check(0 <= self.dropout < 1, "lora.dropout", "must be in [0, 1)")
        check(bool(self.targets), "lora.targets", f"name at least one projection ({', '.join(PROJECTIONS)})")

    @property
    def enabled(self) -> bool:
        return self.r > 0


@dataclass
class AdapterSpec:
    """What a model's adapters are, kept on the model (`model.adapter_spec`) to save them."""

    r: int
    alpha: float
    dropout: float
    targets: list[str]
    base: str                            # the base checkpoint's directory (base_model_name_or_path)
    modules_to_save: list[str] = field(default_factory=list)


class LoRALinear(nn.Linear):
    """A Linear with a low-rank update: y = x W^T + b + scaling * B(A(dropout(x))), scaling = alpha / r.

    Holds the base layer's own `weight` and `bias` parameters (their names unchanged); `active`
    False computes the base layer alone."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float, generator: torch.Generator):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Linear(base.in_features, r, bias=False, **kw)      # (r, I)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, **kw)     # (O, r)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = alpha / r
        self.active = True
        with torch.no_grad():   # PEFT's init: kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(I), 1/sqrt(I)); B = 0
            bound = 1 / math.sqrt(base.in_features)
            u = torch.rand(self.lora_A.weight.shape, generator=generator, dtype=torch.float32)
            self.lora_A.weight.copy_((u * 2 - 1) * bound)
            self.lora_B.weight.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if not self.active:
            return y
        return y + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """scaling x B A: (O, I), in float32."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def has_adapters(model: nn.Module) -> bool:
    return getattr(model, "adapter_spec", None) is not None


def add_lora(model: nn.Module, cfg: LoraConfig, *, base: str | Path, seed: int = 0,
             modules_to_save: tuple[str, ...] = ()) -> nn.Module:
    """Put adapters of cfg's rank on the projections named in cfg.targets and freeze everything
    else but `modules_to_save` (top-level modules, e.g. "score"). `base` is the checkpoint the
    weights came from (saved as base_model_name_or_path). Returns the model, changed in place."""
    available = sorted({name.rsplit(".", 1)[-1] for name, m in model.model.layers.named_modules()
                        if type(m) is nn.Linear})
    unknown = [t for t in cfg.targets if t not in available]
    if unknown:
        raise UserError(f"config key 'lora.targets': {', '.join(map(repr, unknown))} names no projection of "
                        f"this model; its projections are {', '.join(available)}")
    generator = torch.Generator().manual_seed(seed)
    model.requires_grad_(False)
    for layer_name, layer in model.model.layers.named_children():
        for name, module in list(layer.named_modules()):
            if type(module) is nn.Linear and name.rsplit(".", 1)[-1] in cfg.targets:
                parent = layer.get_submodule(name.rsplit(".", 1)[0]) if "." in name else layer
                setattr(parent, name.rsplit(".", 1)[-1], LoRALinear(module, cfg.r, cfg.alpha, cfg.dropout, generator))
    for name in modules_to_save:
        getattr(model, name).requires_grad_(True)
    model.adapter_spec = AdapterSpec(cfg.r, cfg.alpha, cfg.dropout, sorted(cfg.targets), str(base),
                                     list(modules_to_save))
    return model


def for_training(model: nn.Module, cfg: LoraConfig, *, base: str | Path, seed: int,
                 modules_to_save: tuple[str, ...] = (), saved: bool = True) -> nn.Module:
    """The model a stage trains: the model itself (lora.r = 0), or with adapters (lora.r > 0) whose
    base is the checkpoint `base` (--init). A saved adapter's base must be a full checkpoint, so an
    --init that is itself an adapter is refused, naming the fix; `saved` False (PPO's critic, kept
    in the resume state only) takes any base."""
    if not cfg.enabled:
        return model
    base = Path(base).resolve()
    if saved and is_adapter_dir(base):
        adapter = read_adapter_config(base)
        raise UserError(f"--init {base} is a LoRA adapter, but lora.r={cfg.r} trains a new adapter, whose base must "
                        f"be a full checkpoint: merge it first (`lmschool merge {adapter.get('base_model_name_or_path')} "
                        f"{base} --out DIR`) and pass --init DIR, or set lora.r=0 to train every weight of it")
    return add_lora(model, cfg, base=str(base), seed=seed, modules_to_save=modules_to_save)


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Inside the block every adapter of `model` is off: the model computes its base's outputs."""
    layers = list(lora_layers(model).values())
    before = [m.active for m in layers]
    for m in layers:
        m.active = False
    try:
        yield model
    finally:
        for m, was in zip(layers, before):
            m.active = was


class WithoutAdapters(nn.Module):
    """A view of a model with adapters as its base model (DPO's and PPO's reference): `forward`
    and `hidden` run with the adapters off and in eval mode (as a loaded reference is); everything
    else (lm_head, config, new_cache ...) is the model's own. No weights are copied."""

    adapters_active = False   # what generation's packed weights read: pack the base weights alone

    def __init__(self, model: nn.Module):
        super().__init__()
        self.inner = model

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["inner"], name)

    def _call(self, fn, *args, **kwargs):
        was_training = self.inner.training
        self.inner.train(False)
        try:
            with adapters_disabled(self.inner):
                return fn(*args, **kwargs)
        finally:
            self.inner.train(was_training)

    def forward(self, *args, **kwargs):
        return self._call(self.inner, *args, **kwargs)

    def hidden(self, *args, **kwargs):
        return self._call(self.inner.hidden, *args, **kwargs)

    def train(self, mode: bool = True):   # the policy's mode is the trainer's to set, not the reference's
        return self

    def requires_grad_(self, requires_grad: bool = True):   # freezing the view must not freeze the adapters
        return self


@torch.no_grad()
def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight, W <- W + (alpha / r) B A (computed in float32), and put
    plain Linears back: the model is an ordinary Transformer again, every parameter trainable."""
    for name, module in lora_layers(model).items():
        module.weight.copy_((module.weight.float() + module.delta_weight()).to(module.weight.dtype))
        plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                          device="meta")
        plain.weight, plain.bias = module.weight, module.bias
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, leaf, plain)
    model.requires_grad_(True)
    model.adapter_spec = None
    return model


# ---- the PEFT format ---------------------------------------------------------------------------------

def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trained tensors under PEFT's names: each adapter's lora_A / lora_B and every parameter
    of `modules_to_save`."""
    out = {}
    for name, module in lora_layers(model).items():
        out[f"{PREFIX}{name}.lora_A.weight"] = module.lora_A.weight
        out[f"{PREFIX}{name}.lora_B.weight"] = module.lora_B.weight
    for top in model.adapter_spec.modules_to_save:
        for name, p in getattr(model, top).named_parameters():
            out[f"{PREFIX}{top}.{name}"] = p
    return {k: v.detach().to("cpu").contiguous() for k, v in out.items()}


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trained tensors under the model's own names (for a second model's resume state)."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach().cpu() for k, v in model.state_dict().items() if k in names}


def load_adapter_state(model: nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Copy PEFT-named tensors into the model's adapters (and modules_to_save); every one expected
    must be there, each of its shape."""
    expected = adapter_state_dict(model)
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    if missing or unexpected:
        raise UserError(f"{where} does not match its {ADAPTER_CONFIG}: missing {missing[:3]}, unexpected "
                        f"{unexpected[:3]}; the adapter is damaged or was made for another model")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, value in tensors.items():
            target = params[key[len(PREFIX):]]
            if target.shape != value.shape:
                raise UserError(f"{where}: {key} has shape {tuple(value.shape)}, the model needs "
                                f"{tuple(target.shape)}; the adapter was made for a model of another shape")
            target.copy_(value)


def peft_config(model: nn.Module) -> dict:
    """adapter_config.json as PEFT writes it (the keys a LoRA adapter needs)."""
    spec = model.adapter_spec
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM" if model.head == "lm" else "SEQ_CLS",
        "base_model_name_or_path": spec.base, "revision": None, "r": spec.r, "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout, "target_modules": spec.targets, "bias": "none",
        "modules_to_save": spec.modules_to_save or None, "fan_in_fan_out": False, "init_lora_weights": True,
        "inference_mode": True, "use_rslora": False, "use_dora": False, "layers_to_transform": None,
        "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
    }


def save_adapter(directory: Path, model: nn.Module) -> None:
    """Write adapter_config.json and adapter_model.safetensors into an existing directory."""
    from safetensors.torch import save_file
    save_file(adapter_state_dict(model), str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (directory / ADAPTER_CONFIG).write_text(json.dumps(peft_config(model), indent=2) + "\n")


def is_adapter_dir(path: Path) -> bool:
    return (path / ADAPTER_CONFIG).is_file() and not (path / "model.safetensors").is_file()


def read_adapter_config(path: Path) -> dict:
    """adapter_config.json of a LoRA adapter lmschool can apply (plain LoRA: no DoRA, rsLoRA,
    per-layer ranks), checked."""
    file = path / ADAPTER_CONFIG
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{file} cannot be read ({e}); the adapter is damaged") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise UserError(f"{file}: not a LoRA adapter (peft_type {config.get('peft_type') if isinstance(config, dict) else None!r}); "
                        "lmschool applies LoRA adapters only")
    unsupported = [k for k in ("use_dora", "use_rslora", "rank_pattern", "alpha_pattern", "layers_to_transform")
                   if config.get(k)]
    if unsupported or config.get("bias", "none") != "none" or config.get("fan_in_fan_out"):
        raise UserError(f"{file}: {', '.join(unsupported) or 'bias/fan_in_fan_out'} is set; lmschool applies "
                        "plain LoRA adapters (merge it with peft's merge_and_unload() instead)")
    targets = config.get("target_modules")
    if isinstance(targets, str):
        raise UserError(f"{file}: target_modules {targets!r} is a pattern; lmschool needs a list of projection names")
    return config


def lora_config_of(adapter: dict) -> LoraConfig:
    return LoraConfig(r=int(adapter["r"]), alpha=float(adapter["lora_alpha"]),
                      dropout=float(adapter.get("lora_dropout") or 0.0), targets=list(adapter["target_modules"]))


def adapter_base(path: Path, adapter: dict) -> Path:
    """The base checkpoint an adapter was trained on: base_model_name_or_path, absolute or relative
    to the adapter's directory; where that is gone, the base at the same place relative to the
    adapter as when lmschool saved it (a runs directory moved or copied as a whole)."""
    name = adapter.get("base_model_name_or_path")
    if not name:
        raise UserError(f"{path / ADAPTER_CONFIG} names no base_model_name_or_path; merge it onto its base "
                        f"with `lmschool merge BASE {path} --out DIR`")
    base = Path(name)
    if not base.is_absolute() and not base.exists():
        base = path / base
    if not base.exists():   # moved with the adapter (runs/ copied elsewhere): lmschool's relative record
        try:
            relative = json.loads((path / LMSCHOOL_CONFIG).read_text(encoding="utf-8")).get(RELATIVE_BASE)
        except (OSError, ValueError, AttributeError):
            relative = None
        if isinstance(relative, str) and (path / relative).exists():
            base = (path / relative).resolve()
    if not base.exists():
        raise UserError(f"{path} is a LoRA adapter on {name} (its {ADAPTER_CONFIG}: base_model_name_or_path), "
                        f"which does not exist here; restore it, or set that key to where the base is")
    return base
