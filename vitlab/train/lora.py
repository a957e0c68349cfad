"""LoRA / DoRA fine-tuning in a training run: adapters on the model a run starts from, and what the run saves.

With ``lora_rank`` > 0 (``--lora-rank``), :func:`apply_lora` adds ``peft`` adapters to ``lora_targets`` of every
encoder block (:func:`vitlab.models.lora.add_lora`) and freezes everything else except what ``lora_train`` names:
``head`` (the head and pre-logits), ``norm`` (every LayerNorm), or freeze-style patterns (``pos_embed``,
``blocks.10-11.mlp``, see :func:`vitlab.train.transfer.matching_parameters`). By default the head trains when it is
new (all zeros: a zero-initialised head for new classes, or a released head that was zeroed), and nothing else
does. The rest of the run (DDP, gradient accumulation, EMA, resume, ``torch.compile``, layer decay) is unchanged:
frozen parameters simply have no gradient and no optimiser state.

At the end :func:`save_lora` writes ``adapter.safetensors`` (the adapters, the head and whatever else trained; the
base checkpoint's name and sha256 recorded, :mod:`vitlab.checkpoints.adapter`) and, with ``merge_lora``, the merged
model as ``model.safetensors`` in vitlab's format.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

from torch import nn

from ..checkpoints import save, save_adapter
from ..checkpoints.adapter import base_record
from ..errors import VitlabError
from ..factory import checkpoint_location
from ..models.lora import LoraSettings, add_lora, count_parameters, merge_lora
from ..preprocessing import Preprocessing
from .config import TrainConfig
from .runfolder import RunFolder
from .transfer import matching_parameters

HEAD_PARTS = ("head.", "pre_logits.")


def settings_of(config: TrainConfig) -> LoraSettings:
    """The run's :class:`~vitlab.models.lora.LoraSettings`."""
    return LoraSettings(rank=config.lora_rank, alpha=config.lora_alpha, dropout=config.lora_dropout,
                        targets=tuple(config.lora_targets), dora=config.dora)


def check_lora_config(config: TrainConfig) -> None:
    """Refuse (one line) what LoRA does not combine with."""
    if not config.lora_rank:
        return
    if not config.init_from:
        raise VitlabError("lora_rank: LoRA adapts a trained model; give init_from (the checkpoint to adapt; vitlab "
                          "finetune --from)", options=("lora_rank", "init_from"))
    clashes = [name for name, on in (("linear_probe", config.linear_probe), ("freeze_blocks", config.freeze_blocks),
                                     ("freeze", config.freeze)) if on]
    if clashes:
        raise VitlabError(f"lora_rank with {', '.join(clashes)}: LoRA freezes the backbone itself; choose what else "
                          "trains with lora_train=head,norm", options=("lora_rank", *clashes, "lora_train"))


def _extra_names(model: nn.Module, words: list[str]) -> list[str]:
    """Parameter names ``lora_train`` selects (``head``, ``norm``, ``none`` or patterns), in model order (``model``:
    the plain model, before DDP or compilation)."""
    names = [n for n, _ in model.named_parameters()]
    chosen: set[str] = set()
    norms = {f"{m}.{p}" for m, module in model.named_modules() if isinstance(module, nn.LayerNorm)
             for p, _ in module.named_parameters(recurse=False)}
    for word in words:
        if word == "none":
            continue
        if word == "head":
            chosen |= {n for n in names if n.startswith(HEAD_PARTS)}
        elif word == "norm":
            chosen |= norms
        else:
            chosen |= set(matching_parameters(model, [word]))
    return [n for n in names if n in chosen]


def apply_lora(model: nn.Module, config: TrainConfig, log: Callable[[str], None] | None = None) -> nn.Module:
    """Add the run's adapters to ``model`` (in place; before DDP and the optimiser) and unfreeze what
    ``lora_train`` names; says in ``log`` what trains."""
    check_lora_config(config)
    settings = settings_of(config)
    head = getattr(getattr(model, "head", None), "weight", None)
    new_head = head is not None and not bool(head.detach().any())
    words = config.lora_train if config.lora_train is not None else (["head"] if new_head else ["none"])
    extras = _extra_names(model, words)  # before the adapters: patterns name the model's own parameters
    add_lora(model, settings)
    wanted = set(extras)
    for name, param in model.named_parameters():
        if name in wanted:
            param.requires_grad_(True)
    model.lora_trained = extras
    if log is not None:
        trainable, total = count_parameters(model)
        also = f"; also training {', '.join(words)}" if extras else "; nothing else trains"
        log(f"{'DoRA' if settings.dora else 'LoRA'} rank {settings.rank} (alpha {settings.scale * settings.rank:g}, "
            f"dropout {settings.dropout:g}) on {','.join(settings.targets)} of every block{also}: {trainable:,} of "
            f"{total:,} parameters train ({100 * trainable / total:.2f}%)")
    return model


def save_lora(model: nn.Module, run_dir: Path, config: TrainConfig, preprocessing: Preprocessing,
              class_names: list[str] | None, metadata: dict) -> Path:
    """Write the run's ``adapter.safetensors`` (and with ``merge_lora`` the merged ``model.safetensors``); returns
    the merged model's path when it was written, else the adapter's."""
    base = base_record(config.init_from, checkpoint_location(config.init_from))
    own = [n for n, _ in model.named_parameters()]
    # the head always goes into the file (a few thousand values): the base's own head, kept or replaced, is
    # then never needed to rebuild the model
    trained = list(dict.fromkeys(getattr(model, "lora_trained", []) + [n for n in own if n.startswith(HEAD_PARTS)]))
    path = save_adapter(model, RunFolder(run_dir).adapter, base=base, trained=trained, preprocessing=preprocessing,
                        class_names=class_names, metadata=metadata)
    if not config.merge_lora:
        return Path(path)
    merged = merge_lora(copy.deepcopy(model))
    return Path(save(merged, RunFolder(run_dir).model, preprocessing=preprocessing, class_names=class_names,
                     metadata={**metadata, "lora_base": base}))
