"""The training configuration: one flat dataclass, printable, serialisable and overridable by ``key=value``.

Configs are code (as in big_vision): a recipe (:mod:`vitlab.train.recipes`) is a dict of field values on top of the
defaults, and the command line changes fields with flags or ``--set key=value``. The resolved config is written to
the run folder as ``config.json`` and stored in every checkpoint, so a run can be reproduced and resumed from it.
"""

from __future__ import annotations

import json
import typing
from dataclasses import asdict, dataclass, field, fields, replace

from ..errors import InvalidValueError


@dataclass
class TrainConfig:
    """Every setting of a training run. Units: learning rates per optimiser step, steps are optimiser steps, batch
    sizes are global (all processes and accumulation steps together)."""

    # ----- data
    data: str = "fashion-mnist"             # a named set, an image folder or tar shards (see vitlab.data)
    data_dir: str | None = None             # where named sets' files are (default: system and cache locations)
    val_data: str | None = None             # evaluation source (default: the same data, split eval_split)
    train_split: str = "train"
    eval_split: str = "test"
    download: bool = False                  # let torchvision download named sets when missing
    num_classes: int | None = None          # needed only for tar shards without classes.txt
    on_bad_image: str = "skip"              # skip (count and name in the log) or fail
    num_workers: int = 2                    # DataLoader workers for folders and shards (in-memory sets use none)
    augment: str = "inception"              # inception (paper), crop, shift, flip, resize, none
    crop_scale: tuple[float, float] = (0.05, 1.0)  # area range of the random crop (paper: 5%..100%)
    flip: bool = True
    max_shift: int = 2                      # pixels, for augment=shift
    randaugment: tuple[int, int] | None = None  # (num_ops, magnitude), e.g. (2, 9)
    mixup: float = 0.0                      # Beta(alpha, alpha) of mixup; 0 = off
    cutmix: float = 0.0                     # Beta(alpha, alpha) of cutmix; 0 = off (both on: one or the other)
    label_smoothing: float = 0.0
    train_subset: int | None = None         # train on this many images: a class-balanced random choice fixed
                                            # by the seed, nested as the size grows (in-memory sets only)
    holdout: int = 0                        # hold out this many training images (class-balanced, disjoint
                                            # from train_subset) and evaluate on them instead (tuning)
    patch_dropout: float = 0.0              # fraction of patch tokens dropped per training image (PatchDropout)

    # ----- model
    model: str = "vit_fmnist"               # a registered name (vitlab models)
    model_args: dict = field(default_factory=dict)  # ViTConfig overrides, e.g. {"depth": 4, "dropout": 0.1}
    img_size: int | None = None             # input resolution (default: the model's own)
    init_from: str | None = None            # checkpoint to start from (fine-tuning); any format vitlab.load reads
    reset_head: str = "auto"                # auto (new zero head when the classes differ), always, never

    # ----- fine-tuning controls (vitlab.train.transfer)
    linear_probe: bool = False              # train the head only (final norm frozen; dropout, drop-path off)
    freeze_blocks: int = 0                  # freeze the embedding and the first N encoder blocks
    freeze: list[str] = field(default_factory=list)  # parameter-name patterns to freeze: globs, module prefixes,
                                            # index ranges (patch_embed, pos_embed, blocks.0-5, blocks.*.attn)
    layer_decay: float | None = None        # layer-wise lr decay (BEiT / MAE): layer l at lr x decay^(L+1-l)

    # ----- optimisation
    optimizer: str = "adamw"                # adamw (Adam with decoupled weight decay) or sgd (momentum)
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = 0.9                   # sgd only
    weight_decay: float = 0.0               # decoupled, on weight matrices only (not biases, norms, embeddings)
    schedule: str = "cosine"                # cosine, linear or constant after the warmup
    warmup_steps: int | None = None         # linear warmup from 0; default: warmup_epochs
    warmup_epochs: float = 0.0
    end_lr_factor: float = 0.0              # final learning rate = lr x end_lr_factor
    epochs: float | None = 10               # training length in epochs ...
    steps: int | None = None                # ... or in optimiser steps (takes precedence)
    batch_size: int = 256                   # global batch per optimiser step
    accum_steps: int = 1                    # gradient accumulation: micro-batch = batch / (processes x accum)
    grad_clip: float = 0.0                  # global gradient-norm clip; 0 = off
    ema_decay: float = 0.0                  # Polyak / EMA averaging of the weights; 0 = off
    ema_warmup: bool = True                 # decay min(ema_decay, (1 + step) / (10 + step)) early on

    # ----- runtime
    seed: int = 0
    deterministic: bool = False             # torch.use_deterministic_algorithms (bitwise-repeatable on CPU)
    device: str = "auto"                    # auto, cpu, cuda, cuda:1, ...
    precision: str = "auto"                 # fp32, bf16 (autocast) or auto (bf16 on GPUs that have it)
    compile: bool = False                   # torch.compile the model
    threads: int | None = None              # torch intra-op threads (default: torch's choice)
    fsdp: bool = False                      # shard parameters with FSDP2 instead of DDP (multi-process runs)
    eval_batch_size: int = 500
    eval_every_epochs: float = 1.0          # 0 = evaluate only at the end
    save_every_steps: int = 0               # also write last.pt every N steps (0 = at each evaluation only)
    log_every_steps: int = 50
    max_bad_steps: int = 20                 # stop after this many consecutive non-finite steps
    out_dir: str = "runs"
    run_name: str | None = None             # default: <data>-<model>-<timestamp>
    progress: bool = True                   # tqdm progress bar (on a terminal)

    def __post_init__(self) -> None:
        self.freeze = _pattern_list("freeze", self.freeze)
        if isinstance(self.freeze_blocks, bool) or not isinstance(self.freeze_blocks, int) or self.freeze_blocks < 0:
            raise InvalidValueError(f"freeze_blocks must be a non-negative integer, got {self.freeze_blocks!r}")
        if self.layer_decay is not None and not 0.0 < self.layer_decay <= 1.0:
            raise InvalidValueError(f"layer_decay must be in (0, 1] (e.g. 0.65 or 0.75), got {self.layer_decay}")

    def to_dict(self) -> dict:
        """JSON-ready dict (tuples become lists)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error (a typo must not be ignored)."""
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise InvalidValueError(f"unknown training config keys: {', '.join(unknown)}")
        hints = typing.get_type_hints(cls)
        values = {k: _coerce(k, v, hints[k]) for k, v in data.items()}
        return cls(**values)

    def replace(self, **changes) -> TrainConfig:
        """A copy with fields changed (names checked)."""
        merged = self.to_dict()
        merged.update(changes)
        return TrainConfig.from_dict(merged)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def _pattern_list(key: str, value) -> list[str]:
    """A list of strings from a list or a comma-separated string (``--set freeze=patch_embed,blocks.0-5``)."""
    if value is None:
        return []
    if isinstance(value, str):
        value = value.split(",")
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise InvalidValueError(f"{key} must be a list of strings or a comma-separated string, got {value!r}")
    return [part.strip() for v in value for part in v.split(",") if part.strip()]


def _coerce(key: str, value, hint):
    """Bring a JSON value back to the field's type (lists to tuples for tuple fields)."""
    if value is None:
        return None
    args = typing.get_args(hint)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner[0]) if len(inner) == 1 else value
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise InvalidValueError(f"{key} needs {len(args)} values, got {value!r}")
        return tuple(a(v) for a, v in zip(args, value))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and not isinstance(value, hint):
        raise InvalidValueError(f"{key} must be {hint.__name__}, got {value!r}")
    return value


def parse_value(key: str, text: str):
    """Parse the text of ``--set key=value`` for field ``key``: JSON when it parses (numbers, true/false, null,
    lists, dicts), else the raw string. ``model_args.depth=4`` sets one entry of the ``model_args`` dict."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = text
    if isinstance(value, str) and value.lower() in ("none", "null"):
        value = None
    if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off"):
        value = value.lower() in ("true", "yes", "on")
    if isinstance(value, str) and "," in value and key in _TUPLE_KEYS:
        value = [json.loads(v) if v.strip() else v for v in value.split(",")]
    return value


_TUPLE_KEYS = {f.name for f in fields(TrainConfig) if "tuple" in str(f.type)}


def apply_overrides(config: TrainConfig, assignments: list[str]) -> TrainConfig:
    """Apply ``key=value`` strings (``--set``) to ``config``; unknown keys and bad values raise ``ValueError``."""
    data = config.to_dict()
    for item in assignments:
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise InvalidValueError(f"--set expects key=value, got {item!r}")
        if "." in key:
            top, sub = key.split(".", 1)
            if top != "model_args":
                raise InvalidValueError(f"--set {key}: only model_args has sub-keys")
            data["model_args"] = {**data["model_args"], sub: parse_value(sub, text)}
            continue
        if key not in data:
            import difflib

            close = difflib.get_close_matches(key, list(data), n=2)
            hint = f" (did you mean {' or '.join(close)}?)" if close else ""
            raise InvalidValueError(f"--set {key}: unknown training config key{hint}")
        data[key] = parse_value(key, text)
    return TrainConfig.from_dict(data)


def merged(config: TrainConfig, **changes) -> TrainConfig:
    """``dataclasses.replace`` for trusted code paths (no re-validation of types)."""
    return replace(config, **changes)
