"""Fine-tuning controls: which parameters train, and at which learning rate.

- **Freezing** (:func:`freeze`): parameters chosen by name get ``requires_grad=False``, so they get no gradient, no
  optimiser state, no weight decay, and keep their values bit for bit. Patterns (:func:`matching_parameters`) are
  globs on parameter names (``blocks.*.attn.*``), module prefixes (``patch_embed`` is every parameter under it) and
  index ranges (``blocks.0-5`` is blocks 0 to 5, both included).
- **Freezing the first N blocks** (:func:`freeze_first_blocks`): the embedding (patch embedding, class token,
  position embeddings: "layer 0") and blocks 0..N-1; everything above them trains.
- **Linear probe** (:func:`linear_probe`): only the head trains. The final norm stays frozen, so the head sees the
  frozen model's representation (what ``vitlab fewshot`` reads, ``pre_logits``); dropout and drop-path are switched
  off in the whole model, so every image always gives the same features, as users of a linear probe expect.
  (ViTs have no BatchNorm, so there are no running statistics to keep in eval mode.)
- **Layer-wise learning-rate decay** (:func:`layer_decay_groups`, BEiT / MAE): with L blocks, the patch embedding,
  class token and position embeddings are layer 0, block i is layer i + 1, and the final norm, pre-logits and head
  are layer L + 1; a parameter of layer l trains at ``lr x decay^(L + 1 - l)``. Combined with the weight-decay rule of
  :mod:`vitlab.train.optim` (decay on weight matrices only). BEiT's and MAE's assignment; timm's
  ``param_groups_layer_decay`` agrees except that it puts the final norm with the last block (layer L).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable

from torch import nn

from ..checkpoints.channels import adapt_model_channels
from ..checkpoints.inspection import matching_model
from ..errors import VitlabError
from ..factory import read_checkpoint
from ..hub import resolve

_RANGE = re.compile(r"(?<![\w])(\d+)-(\d+)(?![\w])")
_BLOCK = re.compile(r"^blocks\.(\d+)(?:\.|$)")  # the encoder's blocks (not a ResNet's stages.<i>.blocks.<j>)
_EMBEDDING = ("patch_embed", "cls_token", "dist_token", "reg_token", "pos_embed", "pos_embed_x", "pos_embed_y",
              "norm_pre", "mask_token")
# what a linear probe trains (a distilled DeiT has two classifiers)
HEAD_PREFIXES = ("head", "head_dist")


def _clean(name: str) -> str:
    """A parameter name without the prefixes of torch.compile, DDP and vitlab's training wrappers."""
    for prefix in ("_orig_mod.", "module.", "vit."):
        while name.startswith(prefix):
            name = name[len(prefix):]
    return name


def normalise_patterns(patterns: str | Iterable[str] | None) -> list[str]:
    """Patterns from a comma-separated string or a list (empty entries dropped, spaces stripped)."""
    if patterns is None:
        return []
    if isinstance(patterns, str):
        patterns = [patterns]
    out = []
    for item in patterns:
        out += [p.strip() for p in str(item).split(",") if p.strip()]
    return out


def _expand_ranges(pattern: str) -> list[str]:
    """``blocks.0-2.mlp`` -> ``blocks.0.mlp``, ``blocks.1.mlp``, ``blocks.2.mlp`` (every range in the pattern)."""
    match = _RANGE.search(pattern)
    if match is None:
        return [pattern]
    lo, hi = int(match.group(1)), int(match.group(2))
    if hi < lo:
        raise VitlabError(f"freeze pattern {pattern!r}: range {lo}-{hi} is empty (write the low index first)")
    head, tail = pattern[:match.start()], pattern[match.end():]
    return [p for i in range(lo, hi + 1) for p in _expand_ranges(f"{head}{i}{tail}")]


def _matcher(pattern: str) -> Callable[[str], bool]:
    expanded = _expand_ranges(pattern)

    def matches(name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, p + ".*") for p in expanded)

    return matches


def matching_parameters(model: nn.Module, patterns: str | Iterable[str]) -> list[str]:
    """Names of the parameters of ``model`` that any of ``patterns`` selects (in model order).

    A pattern selects a parameter when it matches the whole name as a glob (``*`` also crosses dots) or names a
    module above it (``patch_embed`` selects ``patch_embed.proj.weight``); ``a-b`` stands for every index from a to
    b. A pattern that selects nothing is an error naming the model's top-level parts (a typo must not train what
    was meant to be frozen)."""
    patterns = normalise_patterns(patterns)
    names = [_clean(n) for n, _ in model.named_parameters()]
    chosen: set[str] = set()
    for pattern in patterns:
        match = _matcher(pattern)
        hits = {n for n in names if match(n)}
        if not hits:
            parts = sorted({n.split(".")[0] for n in names})
            raise VitlabError(f"freeze pattern {pattern!r} matches no parameter; the model's parts are "
                              f"{', '.join(parts)} (blocks.0-{num_layers(model) - 1} for the encoder blocks)")
        chosen |= hits
    return [n for n in names if n in chosen]


def num_layers(model: nn.Module) -> int:
    """The number of encoder blocks L (``blocks.<i>`` outside the patch embedding; 0 for a model without any)."""
    ids = [layer for name, _ in model.named_parameters()
           if (layer := _block_index(_clean(name))) is not None]
    return max(ids) + 1 if ids else 0


def _block_index(name: str) -> int | None:
    match = _BLOCK.match(name)
    return int(match.group(1)) if match else None


def layer_id(name: str, depth: int) -> int:
    """The layer of a parameter for layer-wise learning-rate decay: 0 for the embedding (patch embedding with a
    hybrid's ResNet, class, distillation and register tokens, position embeddings, ``norm_pre``, the mask token of
    masked patch prediction), i + 1 for ``blocks.<i>``, ``depth + 1`` for everything above the encoder (final norm,
    fc_norm, attention pooling, pre-logits, heads)."""
    name = _clean(name)
    if name.split(".")[0] in _EMBEDDING:
        return 0
    block = _block_index(name)
    return block + 1 if block is not None else depth + 1


def freeze(model: nn.Module, patterns: str | Iterable[str]) -> list[str]:
    """Freeze (``requires_grad=False``) the parameters ``patterns`` select; returns their names."""
    chosen = set(matching_parameters(model, patterns))
    for name, param in model.named_parameters():
        if _clean(name) in chosen:
            param.requires_grad_(False)
    return sorted(chosen)


def freeze_first_blocks(model: nn.Module, n: int) -> list[str]:
    """Freeze the embedding and the first ``n`` encoder blocks (layers 0..n); returns the frozen names."""
    depth = num_layers(model)
    if not 0 <= n <= depth:
        raise VitlabError(f"freeze_blocks must be between 0 and the model's depth {depth}, got {n}")
    frozen = []
    if n == 0:
        return frozen
    for name, param in model.named_parameters():
        if layer_id(name, depth) <= n:
            param.requires_grad_(False)
            frozen.append(_clean(name))
    return frozen


def disable_stochastic_layers(model: nn.Module) -> None:
    """Dropout and drop-path rates set to 0 everywhere in ``model`` (fixed features for a linear probe)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "drop_path_rate", None), float):  # vitlab's Block and ResNet blocks
            module.drop_path_rate = 0.0
        if isinstance(getattr(module, "attn_drop", None), float):  # the attention-probability dropout rate
            module.attn_drop = 0.0


def linear_probe(model: nn.Module) -> list[str]:
    """Freeze everything but the head (final norm and pre-logits frozen too) and switch dropout / drop-path off;
    returns the frozen names."""
    frozen = []
    for name, param in model.named_parameters():
        clean = _clean(name)
        if not clean.startswith(tuple(p + "." for p in HEAD_PREFIXES)):
            param.requires_grad_(False)
            frozen.append(clean)
    if len(frozen) == len(list(model.parameters())):
        raise VitlabError("linear_probe: the model has no head to train (num_classes=0)")
    disable_stochastic_layers(model)
    return frozen


def apply_controls(model: nn.Module, *, linear_probe_only: bool = False, freeze_blocks: int = 0,
                   patterns: str | Iterable[str] | None = None, layer_decay: float | None = None,
                   log: Callable[[str], None] | None = None) -> None:
    """Apply a run's freezing settings to ``model`` (before it is wrapped for data parallelism and before the
    optimiser is built) and say in ``log`` what trains (and, with ``layer_decay``, at which learning rates; the
    optimiser applies it)."""
    patterns = normalise_patterns(patterns)
    if linear_probe_only:
        linear_probe(model)
    if freeze_blocks:
        freeze_first_blocks(model, freeze_blocks)
    if patterns:
        freeze(model, patterns)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if trainable == 0:
        raise VitlabError("every parameter is frozen: nothing to train (check linear_probe, freeze_blocks, freeze)")
    if log is not None and trainable < total:
        what = []
        if linear_probe_only:
            what.append("linear probe (head only; dropout and drop-path off)")
        if freeze_blocks:
            what.append(f"embedding and first {freeze_blocks} block(s) frozen")
        if patterns:
            what.append(f"frozen by pattern: {', '.join(patterns)}")
        log(f"fine-tuning controls: {'; '.join(what)}: {trainable:,} of {total:,} parameters train "
            f"({100 * trainable / total:.2f}%)")
    if log is not None and layer_decay is not None and layer_decay != 1.0:
        depth = num_layers(model)
        log(f"layer-wise lr decay {layer_decay:g}: layer l of 0..{depth + 1} trains at lr x {layer_decay:g}^"
            f"({depth + 1} - l), from x{layer_decay ** (depth + 1):.3g} (patch embedding) to x1 (head)")


def init_channels(init_from: str | None) -> int | None:
    """The input channel count of the checkpoint a run starts from (None without one): image folders are decoded
    to it, so an RGB checkpoint sees colour images unless ``model_args.in_chans`` says otherwise."""
    if not init_from:
        return None
    return read_checkpoint(init_from, check_finite=False).config.in_chans


def source_model_name(init_from: str) -> str | None:
    """The registered model a fine-tuning run's ``init_from`` checkpoint is, recorded as the run's ``model`` (the
    config's own ``model`` does not build it): a catalog entry's model, else the registered name of the same size and
    patch; None when no registered model matches."""
    resolved = resolve(str(init_from))
    if resolved is not None and resolved.model_name:
        return resolved.model_name
    return matching_model(read_checkpoint(init_from, check_finite=False).config)


def adapt_init_channels(model: nn.Module, in_chans: int | None, source: str,
                        log: Callable[[str], None] | None = None) -> nn.Module:
    """``model`` (loaded from ``source``) taking ``in_chans``-channel images: its input convolution adapted as
    timm's ``adapt_input_conv`` does (:mod:`vitlab.checkpoints.channels`), with a line in ``log`` saying so.
    ``in_chans=None`` or the model's own count returns ``model``."""
    if in_chans is None or model.cfg.in_chans == in_chans:
        return model
    before = model.cfg.in_chans
    rule = "summed over the colour channels" if in_chans == 1 else f"repeated and scaled by {before}/{in_chans}"
    model = adapt_model_channels(model, in_chans)
    if log is not None:
        log(f"fine-tuning from {source}: the checkpoint takes {before}-channel images, the data have {in_chans}: "
            f"input convolution adapted ({rule}, as timm's adapt_input_conv)")
    return model


def layer_scales(depth: int, decay: float) -> list[float]:
    """The learning-rate multiplier of layers 0..depth + 1: ``decay^(depth + 1 - layer)``."""
    return [decay ** (depth + 1 - layer) for layer in range(depth + 2)]


def layer_decay_groups(model: nn.Module, weight_decay: float, decay: float, lr: float,
                       decay_names: set[str]) -> list[dict]:
    """Optimiser parameter groups for layer-wise learning-rate decay: one group per (layer, decayed or not) with its
    own ``lr`` (= ``lr x decay^(L + 1 - layer)``, also kept as ``lr_scale``) and ``weight_decay`` (``weight_decay``
    for the names in ``decay_names``, 0 otherwise). Frozen parameters are left out. Groups are ordered from the top
    layer down, so the first group carries the peak learning rate (what the training log shows)."""
    if not 0.0 < decay <= 1.0:
        raise VitlabError(f"layer_decay must be in (0, 1], got {decay}")
    depth = num_layers(model)
    if depth == 0:
        raise VitlabError("layer_decay needs a transformer with encoder blocks (blocks.<i>); this model has none")
    scales = layer_scales(depth, decay)
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        layer = layer_id(name, depth)
        decayed = name in decay_names or _clean(name) in decay_names
        group = groups.setdefault((layer, decayed), {
            "params": [], "layer": layer, "lr_scale": scales[layer], "lr": lr * scales[layer],
            "weight_decay": weight_decay if decayed else 0.0})
        group["params"].append(param)
    return [groups[key] for key in sorted(groups, key=lambda k: (-k[0], not k[1]))]


def parameter_lrs(model: nn.Module, optimizer) -> dict[str, tuple[float, float]]:
    """``{parameter name: (lr, weight_decay)}`` for every parameter of ``model`` that ``optimizer`` trains (frozen
    ones are absent): what each parameter's update uses right now."""
    names = {id(p): _clean(n) for n, p in model.named_parameters()}
    return {names[id(p)]: (group["lr"], group["weight_decay"]) for group in optimizer.param_groups
            for p in group["params"] if id(p) in names}
