"""Official Google ``.npz`` checkpoints (vit_jax and big_vision) to and from vitlab state dicts.

Reading happens in two steps:

1. :func:`normalise` turns every known variant into one canonical naming, the vit_jax (pre-Linen) names without
   prefix: the ``params/``, ``opt/target/`` or ``params/img/`` prefix is stripped, bfloat16 arrays stored as numpy void
   ``|V2`` become float32, a scanned encoder (``Transformer/encoderblock/...`` with a leading layer axis) is split into
   ``encoderblock_{i}``, Linen block names (``MultiHeadDotProductAttention_0``, ``LayerNorm_1``, ``MlpBlock_0``) are
   renamed to the pre-Linen ones (``..._1``, ``LayerNorm_2``, ``MlpBlock_3``), and big_vision's top-level
   ``pos_embedding`` (no class slot) becomes ``Transformer/posembed_input/pos_embedding``.
2. A table of :class:`NpzRule` maps canonical names to vitlab names; every rule states both directions, so the same
   table writes vit_jax files (:func:`to_npz_arrays`). Every array must be used by a rule, and every rule must find
   its arrays, otherwise the error lists the missing and unexpected names.

Hybrid (ResNet + ViT) checkpoints plug in through :func:`register_npz_backbone`: a backbone says whether it
recognises the arrays, adds its own rules (``conv_root``, ``gn_root``, ``block{s}/unit{u}/...``) and builds the
config of its architecture from the ViT part inferred here.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import InvalidValueError, VitlabError
from ..models import ViTConfig
from .statedicts import need_key

NPZ_PREFIXES = ("opt/target/", "params/img/", "params/")
_LINEN_TO_PRE_LINEN = {"MultiHeadDotProductAttention_0": "MultiHeadDotProductAttention_1",
                       "LayerNorm_1": "LayerNorm_2", "MlpBlock_0": "MlpBlock_3"}
POS_KEY = "Transformer/posembed_input/pos_embedding"
MAP_PREFIX = "MAPHead_0/"  # big_vision's attention-pooling head (pool_type 'map'; SigLIP's image towers)


# ------------------------------------------------------------------------------------------------- rules
@dataclass(frozen=True)
class NpzRule:
    """One vitlab tensor and the npz array(s) it comes from, with the conversion both ways.

    ``to_torch(*arrays) -> tensor`` and ``to_npz(tensor) -> tuple of arrays`` (same order as ``npz_keys``)."""

    torch_key: str
    npz_keys: tuple[str, ...]
    to_torch: Callable[..., torch.Tensor]
    to_npz: Callable[[torch.Tensor], tuple[np.ndarray, ...]]


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a))


def _n(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().float().numpy()


def _same(torch_key: str, npz_key: str) -> NpzRule:
    return NpzRule(torch_key, (npz_key,), lambda a: _t(a), lambda t: (_n(t),))


def _dense(torch_prefix: str, npz_prefix: str) -> list[NpzRule]:
    """Flax Dense (in, out) kernel <-> torch Linear (out, in) weight, plus the bias."""
    return [NpzRule(f"{torch_prefix}.weight", (f"{npz_prefix}/kernel",), lambda a: _t(a.T), lambda t: (_n(t).T,)),
            _same(f"{torch_prefix}.bias", f"{npz_prefix}/bias")]


def _layernorm(torch_prefix: str, npz_prefix: str) -> list[NpzRule]:
    return [_same(f"{torch_prefix}.weight", f"{npz_prefix}/scale"), _same(f"{torch_prefix}.bias", f"{npz_prefix}/bias")]


def _conv_kernel(torch_key: str, npz_key: str) -> NpzRule:
    """Flax conv kernel (kh, kw, in, out) <-> torch (out, in, kh, kw)."""
    return NpzRule(torch_key, (npz_key,), lambda a: _t(a.transpose(3, 2, 0, 1)),
                   lambda t: (_n(t).transpose(2, 3, 1, 0),))


def _attention(torch_prefix: str, npz_prefix: str, heads: int) -> list[NpzRule]:
    """Flax per-head q, k, v kernels (D, H, D/H) and biases (H, D/H) <-> one fused qkv Linear (3D, D), q rows first;
    the output kernel (H, D/H, D) <-> proj (D, D)."""
    names = tuple(f"{npz_prefix}/{p}" for p in ("query", "key", "value"))

    def qkv_weight(*kernels):
        return _t(np.concatenate([k.reshape(k.shape[0], -1).T for k in kernels], axis=0))

    def qkv_weight_back(t):
        dim = t.shape[1]
        return tuple(c.T.reshape(dim, heads, dim // heads) for c in np.split(_n(t), 3, axis=0))

    def qkv_bias_back(t):
        return tuple(c.reshape(heads, -1) for c in np.split(_n(t), 3))

    def out_back(t):
        dim = t.shape[0]
        return (_n(t).T.reshape(heads, dim // heads, dim),)

    return [
        NpzRule(f"{torch_prefix}.qkv.weight", tuple(f"{n}/kernel" for n in names), qkv_weight, qkv_weight_back),
        NpzRule(f"{torch_prefix}.qkv.bias", tuple(f"{n}/bias" for n in names),
                lambda *b: _t(np.concatenate([x.reshape(-1) for x in b])), qkv_bias_back),
        NpzRule(f"{torch_prefix}.proj.weight", (f"{npz_prefix}/out/kernel",),
                lambda a: _t(a.reshape(-1, a.shape[-1]).T), out_back),
        _same(f"{torch_prefix}.proj.bias", f"{npz_prefix}/out/bias"),
    ]


def _map_head(heads: int) -> list[NpzRule]:
    """big_vision's ``MAPHead_0`` <-> ``attn_pool``: the probe is ``latent``; the probe's query projection is ``q``,
    the tokens' key and value projections are fused into ``kv`` (key rows first); then ``proj``, ``norm`` and
    ``mlp`` (timm's ``AttentionPoolLatent`` names, as its npz loader maps them)."""
    mha = f"{MAP_PREFIX}MultiHeadDotProductAttention_0"

    def kernels(*ks):
        return _t(np.concatenate([k.reshape(k.shape[0], -1).T for k in ks], axis=0))

    def kernels_back(t, parts):
        dim = t.shape[1]
        return tuple(c.T.reshape(dim, heads, dim // heads) for c in np.split(_n(t), parts, axis=0))

    def biases(*bs):
        return _t(np.concatenate([b.reshape(-1) for b in bs]))

    def biases_back(t, parts):
        return tuple(c.reshape(heads, -1) for c in np.split(_n(t), parts))

    return [
        _same("attn_pool.latent", f"{MAP_PREFIX}probe"),
        NpzRule("attn_pool.q.weight", (f"{mha}/query/kernel",), kernels, lambda t: kernels_back(t, 1)),
        NpzRule("attn_pool.q.bias", (f"{mha}/query/bias",), biases, lambda t: biases_back(t, 1)),
        NpzRule("attn_pool.kv.weight", (f"{mha}/key/kernel", f"{mha}/value/kernel"), kernels,
                lambda t: kernels_back(t, 2)),
        NpzRule("attn_pool.kv.bias", (f"{mha}/key/bias", f"{mha}/value/bias"), biases, lambda t: biases_back(t, 2)),
        NpzRule("attn_pool.proj.weight", (f"{mha}/out/kernel",), lambda a: _t(a.reshape(-1, a.shape[-1]).T),
                lambda t: (_n(t).T.reshape(heads, t.shape[0] // heads, t.shape[0]),)),
        _same("attn_pool.proj.bias", f"{mha}/out/bias"),
        *_layernorm("attn_pool.norm", f"{MAP_PREFIX}LayerNorm_0"),
        *_dense("attn_pool.mlp.fc1", f"{MAP_PREFIX}MlpBlock_0/Dense_0"),
        *_dense("attn_pool.mlp.fc2", f"{MAP_PREFIX}MlpBlock_0/Dense_1"),
    ]


def encoder_rules(depth: int, num_heads: int) -> list[NpzRule]:
    """The encoder's blocks and final norm (canonical names under ``Transformer/``) <-> ``blocks.{i}.*`` and
    ``norm``, the names of vitlab's image and text towers alike."""
    rules = []
    for i in range(depth):
        blk = f"Transformer/encoderblock_{i}"
        rules += _layernorm(f"blocks.{i}.norm1", f"{blk}/LayerNorm_0")
        rules += _attention(f"blocks.{i}.attn", f"{blk}/MultiHeadDotProductAttention_1", num_heads)
        rules += _layernorm(f"blocks.{i}.norm2", f"{blk}/LayerNorm_2")
        rules += _dense(f"blocks.{i}.mlp.fc1", f"{blk}/MlpBlock_3/Dense_0")
        rules += _dense(f"blocks.{i}.mlp.fc2", f"{blk}/MlpBlock_3/Dense_1")
    return rules + _layernorm("norm", "Transformer/encoder_norm")


def vit_rules(cfg: ViTConfig) -> list[NpzRule]:
    """The vit_jax layout of a plain ViT as rules (canonical npz names <-> vitlab names)."""
    rules = [_conv_kernel("patch_embed.proj.weight", "embedding/kernel"),
             _same("patch_embed.proj.bias", "embedding/bias")]
    if cfg.class_token:
        rules.append(_same("cls_token", "cls"))
    if cfg.pos_embed == "learned":
        rules.append(_same("pos_embed", POS_KEY))
    rules += encoder_rules(cfg.depth, cfg.num_heads)
    if cfg.pool == "map":
        rules += _map_head(cfg.num_heads)
    if cfg.representation_size:
        rules += _dense("pre_logits.fc", "pre_logits")
    if cfg.num_classes:
        rules += _dense("head", "head")
    return rules


# ------------------------------------------------------------------------------------------------- hybrid plug-in
@dataclass(frozen=True)
class NpzBackbone:
    """A convolutional backbone in front of the ViT (the paper's hybrids), for npz reading.

    - ``detect(arrays)``: True when the canonical arrays hold this backbone (e.g. ``conv_root/kernel`` present).
    - ``rules(arrays)``: the :class:`NpzRule` list for the backbone's own arrays (vitlab names on the torch side).
    - ``make_config(vit_fields, arrays)``: the config of the model family ``architecture`` (see
      :data:`vitlab.models.FAMILIES`), given the ViT fields inferred from the transformer arrays.
      ``vit_fields["patch_size"]`` and ``vit_fields["in_chans"]`` then describe ``embedding/kernel`` on the feature
      map (e.g. 1x1 over 1024 channels), which the backbone translates.
    """

    name: str
    architecture: str
    detect: Callable[[Mapping[str, np.ndarray]], bool]
    rules: Callable[[Mapping[str, np.ndarray]], list[NpzRule]]
    make_config: Callable[[dict, Mapping[str, np.ndarray]], object]


NPZ_BACKBONES: list[NpzBackbone] = []


def register_npz_backbone(backbone: NpzBackbone) -> None:
    """Teach the npz reader a backbone (tried in registration order)."""
    NPZ_BACKBONES[:] = [b for b in NPZ_BACKBONES if b.name != backbone.name] + [backbone]


def find_backbone(arrays: Mapping[str, np.ndarray]) -> NpzBackbone | None:
    return next((b for b in NPZ_BACKBONES if b.detect(arrays)), None)


# ------------------------------------------------------------------------------------------------- normalising
@dataclass
class NpzLayout:
    """What :func:`normalise` found out about a file."""

    flavour: str = "vit_jax"  # "vit_jax" (pre-Linen names) or "big_vision" (Linen names / top-level pos_embedding)
    prefix: str = ""
    scanned: bool = False
    bfloat16: list[str] = field(default_factory=list)
    pos_has_class_slot: bool = True
    pooling: str = "token"
    notes: list[str] = field(default_factory=list)


def bfloat16_to_float32(array: np.ndarray) -> np.ndarray:
    """bfloat16 stored as 2-byte numpy void (``|V2``) -> float32, exactly (bfloat16 is the top half of a float32)."""
    bits = array.view(np.uint16).astype(np.uint32) << 16
    return bits.view(np.float32)


def normalise(arrays: Mapping[str, np.ndarray], source: str) -> tuple[dict[str, np.ndarray], NpzLayout]:
    """Every known npz variant -> canonical vit_jax names without prefix, float32 (see the module docstring)."""
    layout = NpzLayout()
    prefixes = [p for p in NPZ_PREFIXES if f"{p}embedding/kernel" in arrays]
    if "embedding/kernel" not in arrays and prefixes:
        layout.prefix = prefixes[0]
    elif "embedding/kernel" not in arrays:
        raise VitlabError(f"{source}: an .npz archive without 'embedding/kernel' (under no prefix, 'params/', "
                          "'opt/target/' or 'params/img/'): not a ViT checkpoint")
    out = canonical_encoder(float32_arrays(arrays, layout, source), layout, source)
    for top_level in ("pos_embedding", "Transformer/pos_embedding"):
        if top_level in out:
            layout.flavour = "big_vision"
            layout.pos_has_class_slot = False
            out[POS_KEY] = out.pop(top_level)
    if "cls" not in out:
        layout.pooling = "map" if any(k.startswith(MAP_PREFIX) for k in out) else "gap"
        layout.pos_has_class_slot = False
    return out, layout


def float32_arrays(arrays: Mapping[str, np.ndarray], layout: NpzLayout, source: str) -> dict[str, np.ndarray]:
    """The arrays under ``layout.prefix``, the prefix stripped, as float32 (bfloat16 ``|V2`` converted exactly);
    the others are left out with a note in ``layout.notes``."""
    out: dict[str, np.ndarray] = {}
    dropped = []
    for key, value in arrays.items():
        if not key.startswith(layout.prefix):
            dropped.append(key)
            continue
        key = key[len(layout.prefix):]
        if value.dtype.kind == "V" and value.dtype.itemsize == 2:
            value = bfloat16_to_float32(value)
            layout.bfloat16.append(key)
        elif value.dtype.kind == "f" and value.dtype != np.float32:
            value = value.astype(np.float32)
        elif value.dtype.kind not in "f":
            raise VitlabError(f"{source}: array {key!r} has dtype {value.dtype}, not a floating-point weight")
        out[key] = value
    if dropped:
        layout.notes.append(f"ignored {len(dropped)} arrays outside {layout.prefix!r} (e.g. {dropped[0]!r})")
    if layout.bfloat16:
        layout.notes.append(f"{len(layout.bfloat16)} arrays stored as bfloat16 (|V2), converted exactly to float32")
    return out


def canonical_encoder(out: dict[str, np.ndarray], layout: NpzLayout, source: str) -> dict[str, np.ndarray]:
    """The encoder under ``Transformer/`` in vit_jax's names: a scanned encoder (``encoderblock/`` with a leading
    layer axis) split into ``encoderblock_{i}``, Linen block names renamed to the pre-Linen ones; ``layout`` says
    what was found."""
    scanned = {k: v for k, v in out.items() if k.startswith("Transformer/encoderblock/")}
    if scanned:
        layout.scanned = True
        layout.flavour = "big_vision"
        depths = {v.shape[0] for v in scanned.values()}
        if len(depths) != 1:
            raise VitlabError(f"{source}: scanned encoder arrays disagree on the layer count: {sorted(depths)}")
        for key, value in scanned.items():
            del out[key]
            rest = key[len("Transformer/encoderblock/"):]
            for i in range(value.shape[0]):
                out[f"Transformer/encoderblock_{i}/{rest}"] = value[i]
    if any(re.match(r"Transformer/encoderblock_\d+/MlpBlock_0/", k) for k in out):
        layout.flavour = "big_vision"
        renamed = {}
        for key, value in out.items():
            parts = key.split("/")
            if len(parts) > 2 and parts[0] == "Transformer" and parts[1].startswith("encoderblock_"):
                parts[2] = _LINEN_TO_PRE_LINEN.get(parts[2], parts[2])
            renamed["/".join(parts)] = value
        out = renamed
    return out


# ------------------------------------------------------------------------------------------------- inference
def infer_vit_fields(arrays: Mapping[str, np.ndarray], layout: NpzLayout, source: str,
                     grid_hint: tuple[int, int] | None = None) -> tuple[dict, list[str]]:
    """The ViT architecture from canonical arrays: patch size, width, depth, heads, MLP size, grid, pooling,
    pre-logits, classes. Returns (ViTConfig fields, notes)."""
    notes = []
    need = functools.partial(need_key, arrays, source=source)

    kernel = need("embedding/kernel")
    if kernel.ndim != 4:
        raise VitlabError(f"{source}: embedding/kernel has shape {kernel.shape}, expected (P, P, C, D)")
    ph, pw, in_chans, dim = kernel.shape
    depth = 0
    while f"Transformer/encoderblock_{depth}/LayerNorm_0/scale" in arrays:
        depth += 1
    if depth == 0:
        raise VitlabError(f"{source}: no encoder blocks found (expected Transformer/encoderblock_0/...)")
    query = need("Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel")
    if query.ndim != 3 or query.shape[0] != dim:
        raise VitlabError(f"{source}: query kernel has shape {query.shape}, expected ({dim}, heads, {dim}/heads)")
    heads = query.shape[1]
    mlp_dim = need("Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel").shape[1]
    class_token = "cls" in arrays
    if POS_KEY in arrays:
        rows = need(POS_KEY).shape[-2]
        n = rows - (1 if layout.pos_has_class_slot else 0)
        grid = _grid(n, grid_hint, source)
    else:
        raise VitlabError(f"{source}: no position embedding found ({POS_KEY} or pos_embedding)")
    representation = arrays["pre_logits/kernel"].shape[1] if "pre_logits/kernel" in arrays else None
    num_classes = arrays["head/kernel"].shape[-1] if "head/kernel" in arrays else 0
    if class_token and not layout.pos_has_class_slot:
        notes.append("position embedding has no class slot (big_vision 'tok'): the class slot is filled with zeros, "
                     "which computes the same")
    fields = dict(
        img_size=(grid[0] * ph, grid[1] * pw), patch_size=(ph, pw), in_chans=in_chans, num_classes=num_classes,
        embed_dim=dim, depth=depth, num_heads=heads, mlp_dim=mlp_dim,
        pool="token" if class_token else layout.pooling,
        class_token=class_token, pos_embed="learned", norm_after_pool=False, representation_size=representation,
        gelu="tanh", norm_eps=1e-6, qkv_bias="Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/bias"
        in arrays,
    )
    return fields, notes


def _grid(n: int, hint: tuple[int, int] | None, source: str) -> tuple[int, int]:
    if hint is not None and hint[0] * hint[1] == n:
        return (int(hint[0]), int(hint[1]))
    side = int(round(n**0.5))
    if side * side != n:
        raise VitlabError(f"{source}: the position embedding has {n} grid rows, not a square grid; pass model_name "
                          "or the image size so that the grid is known")
    return (side, side)


# ------------------------------------------------------------------------------------------------- applying rules
def apply_rules(arrays: Mapping[str, np.ndarray], rules: list[NpzRule], source: str) -> dict[str, torch.Tensor]:
    """Canonical arrays -> vitlab state dict. Every array must be consumed and every rule satisfied; otherwise the
    error lists the missing and the unexpected npz names."""
    used: set[str] = set()
    missing: list[str] = []
    out: dict[str, torch.Tensor] = {}
    for rule in rules:
        absent = [k for k in rule.npz_keys if k not in arrays]
        if absent:
            missing += absent
            continue
        try:
            out[rule.torch_key] = rule.to_torch(*(arrays[k] for k in rule.npz_keys))
        except (ValueError, RuntimeError) as exc:
            shapes = ", ".join(f"{k} {arrays[k].shape}" for k in rule.npz_keys)
            raise VitlabError(f"{source}: wrong shape for {rule.torch_key} from {shapes} ({exc})") from None
        used.update(rule.npz_keys)
    unexpected = sorted(set(arrays) - used)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing arrays: {_list(missing)}")
        if unexpected:
            parts.append(f"unexpected arrays: {_list(unexpected)}")
        raise VitlabError(f"{source}: does not match the expected npz layout; " + "; ".join(parts))
    return out


def _list(names: list[str], limit: int = 20) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def to_npz_arrays(state_dict: Mapping[str, torch.Tensor], cfg: ViTConfig,
                  extra_rules: list[NpzRule] = ()) -> dict[str, np.ndarray]:
    """A vitlab state dict -> the vit_jax ``.npz`` arrays (float32, pre-Linen names, class slot in the position
    embedding). ``extra_rules`` name the tensors of a convolutional backbone (hybrids). Raises ValueError for
    configurations the vit_jax model cannot express."""
    problems = []
    if cfg.pos_embed != "learned":
        problems.append(f"pos_embed={cfg.pos_embed!r} (vit_jax has learned 1D embeddings only)")
    if cfg.pool == "gap" and (cfg.class_token or cfg.norm_after_pool):
        problems.append("gap pooling with a class token or with the norm after pooling (vit_jax 'gap' has neither)")
    if not cfg.qkv_bias:
        problems.append("qkv_bias=False")
    options = cfg.family_options()
    if options:
        problems.append("options the vit_jax ViT lacks: " + ", ".join(f"{k}={v!r}" for k, v in options.items()))
    if problems:
        raise InvalidValueError("cannot write the vit_jax .npz layout for this model: " + "; ".join(problems))
    arrays = {}
    rules = [*extra_rules, *vit_rules(cfg)]
    for rule in rules:
        if rule.torch_key not in state_dict:
            raise ValueError(f"state dict lacks {rule.torch_key!r}")
        for key, value in zip(rule.npz_keys, rule.to_npz(state_dict[rule.torch_key])):
            arrays[key] = np.ascontiguousarray(value, dtype=np.float32)
    extra = sorted(set(state_dict) - {r.torch_key for r in rules})
    if extra:
        raise InvalidValueError(f"cannot write the vit_jax .npz layout: no npz name for {', '.join(extra)}")
    return arrays
