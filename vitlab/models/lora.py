"""Low-rank adapters (LoRA, and DoRA) on a ViT's linear layers, through Hugging Face ``peft``.

:func:`add_lora` puts ``peft``'s LoRA layers in place of the chosen ``nn.Linear`` layers of the encoder blocks
(``peft.inject_adapter_in_model``): the model keeps its class, its methods (``forward_with_attention``,
``forward_intermediates``, the backbone API) and its module names; each adapted layer ``blocks.3.attn.qkv`` becomes a
``peft`` layer holding the frozen original as ``base_layer`` and the adapter as ``lora_A`` / ``lora_B`` (and, for
DoRA, ``lora_magnitude_vector``). Its output is ``W x + b + (alpha / r) B A x`` (Hu et al. 2021); DoRA (Liu et al.
2024) rescales each output row of ``W + (alpha / r) B A`` to a learned magnitude. :func:`merge_lora` folds the
adapters into the weights and gives back the plain model.

Targets are named by vitlab's (timm's) module names inside ``blocks.<i>``: ``qkv`` (the fused query / key / value
projection), ``proj`` (the attention output), ``fc1`` / ``fc2`` (the MLP), with ``attn`` for ``qkv,proj`` and
``mlp`` for ``fc1,fc2``. They are matched only inside the encoder blocks, so ``proj`` never reaches the patch
embedding's convolution (``patch_embed.proj``), the usual trap with timm ViTs.

``peft`` is an optional dependency (``pip install 'vitlab[lora]'``).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from ..errors import InvalidValueError, VitlabError

if TYPE_CHECKING:  # annotations only: the settings and target words load without torch (the CLI's parsers use them)
    from torch import nn

ADAPTER_NAME = "default"  # peft's name for a model's only adapter
TARGET_WORDS = {"qkv": ("qkv",), "proj": ("proj",), "fc1": ("fc1",), "fc2": ("fc2",), "attn": ("qkv", "proj"),
                "mlp": ("fc1", "fc2")}
_TARGET_PATHS = {"qkv": "attn.qkv", "proj": "attn.proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}
DEFAULT_TARGETS = ("qkv", "proj")


@dataclass(frozen=True)
class LoraSettings:
    """What :func:`add_lora` adds: rank ``r``, ``alpha`` (the update is scaled by ``alpha / r``; default ``r``),
    dropout on the adapter's input, target layers (words of :data:`TARGET_WORDS`) and whether it is DoRA."""

    rank: int
    alpha: float | None = None
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    dora: bool = False

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise InvalidValueError(f"lora_rank must be an integer >= 1, got {self.rank!r}")
        if self.alpha is not None and not self.alpha > 0:
            raise InvalidValueError(f"lora_alpha must be a number > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise InvalidValueError(f"lora_dropout must be in [0, 1), got {self.dropout!r}")
        object.__setattr__(self, "targets", tuple(layer_names(self.targets)))

    @property
    def scale(self) -> float:
        return (self.alpha if self.alpha is not None else self.rank) / self.rank

    def to_dict(self) -> dict:
        return {**asdict(self), "targets": list(self.targets)}

    @classmethod
    def from_dict(cls, data: dict) -> LoraSettings:
        try:
            return cls(rank=data["rank"], alpha=data.get("alpha"), dropout=data.get("dropout", 0.0),
                       targets=tuple(data.get("targets") or DEFAULT_TARGETS), dora=bool(data.get("dora", False)))
        except (KeyError, TypeError) as exc:
            raise VitlabError(f"invalid LoRA settings {data!r} ({exc})") from None


def layer_names(targets) -> list[str]:
    """``["attn", "fc2"]`` -> ``["qkv", "proj", "fc2"]``: the target words expanded (order kept, no repeats)."""
    if isinstance(targets, str):
        targets = targets.split(",")
    out: list[str] = []
    for word in (t.strip() for t in targets):
        if not word:
            continue
        if word not in TARGET_WORDS:
            raise InvalidValueError(f"lora_targets: unknown layer {word!r}; takes {', '.join(TARGET_WORDS)} "
                                    "(the linear layers of the encoder blocks)")
        out += [w for w in TARGET_WORDS[word] if w not in out]
    if not out:
        raise InvalidValueError("lora_targets: no layer given (e.g. qkv,proj)")
    return out


def target_pattern(targets) -> str:
    """The regular expression (peft's ``target_modules`` as a string: a full match of the module name) selecting
    the target layers inside the encoder blocks."""
    paths = "|".join(re.escape(_TARGET_PATHS[t]) for t in layer_names(targets))
    return rf"blocks\.\d+\.({paths})"


def _peft():
    """The ``peft`` package (imported here: it is an optional dependency, and slow to import)."""
    try:
        import peft
    except ImportError:
        raise VitlabError("LoRA needs the peft package: pip install 'vitlab[lora]' (or pip install peft)") from None
    return peft


def is_lora_parameter(name: str) -> bool:
    """Whether a parameter (or state-dict entry) of an adapted model belongs to an adapter."""
    return any(f".{part}." in f".{name}." for part in ("lora_A", "lora_B", "lora_magnitude_vector"))


def has_lora(model: nn.Module) -> bool:
    """Whether ``model`` holds peft adapter layers (not merged yet)."""
    return any(is_lora_parameter(name) for name, _ in model.named_parameters())


def add_lora(model: nn.Module, settings: LoraSettings) -> nn.Module:
    """Put LoRA (or DoRA) adapters on ``settings.targets`` of ``model``'s encoder blocks, in place, and return it.
    Every parameter but the adapters' is frozen (``requires_grad=False``); unfreeze others (a new head) after. The
    adapters' ``B`` starts at zero, so the adapted model computes what ``model`` did; ``A`` is drawn from torch's
    global generator (seed it first for a repeatable start)."""
    peft = _peft()
    pattern = target_pattern(settings.targets)
    if not any(re.fullmatch(pattern, name) for name, _ in model.named_modules()):
        raise VitlabError(f"lora_targets {','.join(settings.targets)}: the model has no such layer in blocks.<i> "
                          f"({type(model).__name__} has no encoder blocks of vitlab's ViT)")
    config = peft.LoraConfig(r=settings.rank, lora_alpha=settings.scale * settings.rank,
                             lora_dropout=settings.dropout, target_modules=pattern, use_dora=settings.dora,
                             bias="none")
    model = peft.inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
    for name, param in model.named_parameters():
        param.requires_grad_(is_lora_parameter(name))
    model.lora_settings = settings  # what the adapter file records (kept by deepcopy, e.g. EMA's copy)
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter of ``model`` into its layer's weight and put the plain layer back (in place); returns the
    model, now with vitlab's own parameter names. A model without adapters is returned as it is."""
    from peft.tuners.tuners_utils import BaseTunerLayer  # only reached when has_lora: peft is installed

    if not has_lora(model):
        return model
    adapted = [(name, module) for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)]
    for name, module in adapted:
        module.merge(safe_merge=True)  # safe: refuses (raises) on a non-finite merged weight
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, module.get_base_layer())
    if hasattr(model, "lora_settings"):
        del model.lora_settings
    return model


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapter parameters of ``model`` (in model order)."""
    return [name for name, _ in model.named_parameters() if is_lora_parameter(name)]


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts of ``model``."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
