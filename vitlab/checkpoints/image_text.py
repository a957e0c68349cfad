"""The text towers of two-tower image-text checkpoints (CLIP, SigLIP) and their logit scale / bias, in vitlab's names.

The image tower of the same checkpoints is read by :mod:`.family_layouts` (``vitlab.load``); this module reads the
rest. Layouts:

==========================  =========================================  =========================================
vitlab (``TextTransformer``)  transformers ``CLIPModel`` / ``SiglipModel``  OpenAI CLIP / OpenCLIP
==========================  =========================================  =========================================
token_embed.weight          ``text_model.embeddings.token_embedding``  ``token_embedding.weight``
pos_embed (1, L, D)         ``text_model.embeddings.position_           ``positional_embedding`` (L, D)
                            embedding.weight`` (L, D)
blocks.{i}.attn.qkv         ``...layers.{i}.self_attn.{q,k,v}_proj``   ``transformer.resblocks.{i}.attn.in_proj_*``
blocks.{i}.attn.proj        ``...layers.{i}.self_attn.out_proj``       ``...attn.out_proj``
blocks.{i}.norm1 / norm2    ``...layers.{i}.layer_norm1`` / ``2``      ``...ln_1`` / ``ln_2``
blocks.{i}.mlp.fc1 / fc2    ``...layers.{i}.mlp.fc1`` / ``fc2``        ``...mlp.c_fc`` / ``c_proj``
norm                        ``text_model.final_layer_norm``            ``ln_final``
proj                        ``text_projection`` (CLIP, no bias),       ``text_projection`` (D, P), transposed
                            ``text_model.head`` (SigLIP, with bias)
logit_scale / logit_bias    ``logit_scale`` / ``logit_bias``           ``logit_scale`` / ``logit_bias``
==========================  =========================================  =========================================

What the weights cannot show comes from the checkpoint's config: transformers' ``text_config`` (heads, activation,
LayerNorm epsilon, end-of-text id; missing fields take transformers' config-class defaults) or OpenCLIP's
``open_clip_config.json`` (``text_cfg.heads``, ``quick_gelu``); without one, OpenCLIP's conventions (64-wide heads,
QuickGELU as OpenAI released it).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch

from ..atomic import atomic_directory
from ..errors import InvalidValueError, VitlabError
from ..models.text import TextConfig
from ..preprocessing import Preprocessing
from .big_vision_text import big_vision_text_tower
from .family_layouts import HF_ACTIVATIONS, open_clip_block_rules, to_transformers, transformers_class
from .files import read_json_object, read_npz, read_safetensors, read_torch, sniff, write_json, write_safetensors
from .loading import _read_hf_weights
from .statedicts import QKV_TARGET, fuse_qkv, rename_keys, split_qkv, unwrap_state_dict
from .text_tower import TextTower

IMAGE_TEXT_TYPES = ("clip", "siglip")  # transformers model types with both towers
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
# transformers' CLIPTextConfig / SiglipTextConfig defaults, for fields a config.json leaves out
_HF_TEXT_DEFAULTS = {
    "clip": {"num_attention_heads": 8, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "eos_token_id": 49407,
             "pad_token_id": 1},
    "siglip": {"num_attention_heads": 12, "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6,
               "eos_token_id": 49407, "pad_token_id": 1},
}
_HF_TEXT_QKV = r"encoder\.layers\.(\d+)\.self_attn\.(q|k|v)_proj\.(weight|bias)"
_HF_TEXT_RULES = [
    (r"embeddings\.token_embedding\.weight", "token_embed.weight"),
    (r"encoder\.layers\.(\d+)\.layer_norm([12])\.(weight|bias)", r"blocks.\1.norm\2.\3"),
    (r"encoder\.layers\.(\d+)\.self_attn\.out_proj\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (r"encoder\.layers\.(\d+)\.mlp\.fc([12])\.(weight|bias)", r"blocks.\1.mlp.fc\2.\3"),
    (r"final_layer_norm\.(weight|bias)", r"norm.\1"),
    (r"head\.(weight|bias)", r"proj.\1"),
]
_OPEN_CLIP_TEXT_RULES = [
    (r"token_embedding\.weight", "token_embed.weight"),
    *open_clip_block_rules("transformer"),
    (r"ln_final\.(weight|bias)", r"norm.\1"),
]
# text widths whose published towers do not have 64-wide heads (SigLIP So400m: 16 heads of 72)
_PUBLISHED_HEADS = {1152: 16}
# OpenAI's released state dicts carry these scalars beside the weights (its build_model deletes them)
_OPENAI_SCALARS = ("input_resolution", "context_length", "vocab_size")


def _need(sd: dict, key: str, source: str) -> torch.Tensor:
    if key not in sd:
        raise VitlabError(f"{source}: the text tower lacks {key} (vitlab's name); the checkpoint is incomplete")
    return sd[key]


def _shape_fields(sd: dict[str, torch.Tensor], source: str) -> dict:
    """The architecture fields the tensors show (vitlab names): vocabulary, context, width, depth, MLP width,
    projection."""
    vocab, width = _need(sd, "token_embed.weight", source).shape
    depth = len({m.group(1) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))})
    if depth == 0:
        raise VitlabError(f"{source}: the text tower has no transformer blocks")
    proj = sd.get("proj.weight")
    return {"vocab_size": int(vocab), "context_length": int(_need(sd, "pos_embed", source).shape[1]),
            "embed_dim": int(width), "depth": depth,
            "mlp_dim": int(_need(sd, "blocks.0.mlp.fc1.weight", source).shape[0]),
            "proj_dim": int(proj.shape[0]) if proj is not None else 0, "proj_bias": "proj.bias" in sd}


def _scalar(sd: dict, key: str, source: str) -> torch.Tensor:
    value = sd.get(key)
    if value is None:
        raise VitlabError(f"{source}: no {key} in the weights (a two-tower CLIP / SigLIP checkpoint stores it)")
    return value.detach().clone().float()


# ------------------------------------------------------------------------------------------------- transformers
def hf_text_tower(state_dict: dict[str, torch.Tensor], hf: dict, source: str) -> TextTower:
    """A transformers ``CLIPModel`` / ``SiglipModel`` state dict and its ``config.json`` -> the text tower."""
    model_type = hf.get("model_type")
    if model_type not in IMAGE_TEXT_TYPES:
        raise VitlabError(f"{source}: model_type {model_type!r} is not a two-tower image-text model vitlab reads "
                          f"(one of {', '.join(IMAGE_TEXT_TYPES)})")
    text_cfg = hf.get("text_config") or {}
    if not isinstance(text_cfg, dict):
        raise VitlabError(f"{source}: text_config is not an object")
    text_cfg = {**_HF_TEXT_DEFAULTS[model_type], **{k: v for k, v in text_cfg.items() if v is not None}}
    notes = [f"transformers {', '.join(hf.get('architectures') or [model_type])} text tower"]
    text = {k[len("text_model."):]: v for k, v in state_dict.items() if k.startswith("text_model.")}
    if not text:
        raise VitlabError(f"{source}: no text_model.* tensors; a vision-only checkpoint has no text tower "
                          "(load its image tower with vitlab.load)")
    text.pop("embeddings.position_ids", None)  # transformers < 4.31 saved this index buffer (an arange)
    position = text.pop("embeddings.position_embedding.weight", None)
    text = rename_keys(fuse_qkv(text, _HF_TEXT_QKV, ("q", "k", "v"), QKV_TARGET, source), _HF_TEXT_RULES)
    if position is not None:
        text["pos_embed"] = position.unsqueeze(0)
    if model_type == "clip" and "text_projection.weight" in state_dict:
        text["proj.weight"] = state_dict["text_projection.weight"]
    act = text_cfg["hidden_act"]
    if act not in HF_ACTIVATIONS:
        raise VitlabError(f"{source}: text_config hidden_act {act!r} is not one vitlab computes "
                          f"({', '.join(HF_ACTIVATIONS)})")
    eos = text_cfg.get("eos_token_id")
    if model_type == "clip" and eos == 2:
        eos = None  # configs written before transformers#24773 say 2: transformers then pools the highest id
    pad = text_cfg.get("pad_token_id")
    fields = _shape_fields(text, source)
    if "text_config" not in hf:  # a weights file without its config.json: the published models' head widths
        text_cfg["num_attention_heads"] = _PUBLISHED_HEADS.get(fields["embed_dim"], max(fields["embed_dim"] // 64, 1))
        notes.append(f"no config.json: {text_cfg['num_attention_heads']} text heads assumed for width "
                     f"{fields['embed_dim']}, and transformers' {model_type} defaults for the rest")
    try:
        config = TextConfig(**fields, num_heads=int(text_cfg["num_attention_heads"]), causal=model_type == "clip",
                            pool="eos" if model_type == "clip" else "last", gelu=HF_ACTIVATIONS[act],
                            norm_eps=float(text_cfg["layer_norm_eps"]),
                            pad_id=pad if isinstance(pad, int) and 0 <= pad < fields["vocab_size"] else None,
                            eos_id=eos if isinstance(eos, int) and 0 <= eos < fields["vocab_size"] else None)
    except (TypeError, ValueError) as exc:
        raise VitlabError(f"{source}: text_config describes no text tower vitlab can build ({exc})") from None
    bias = state_dict.get("logit_bias")
    return TextTower(config, text, _scalar(state_dict, "logit_scale", source),
                     None if bias is None else bias.detach().clone().float(), f"hf_{model_type}", notes)


# ------------------------------------------------------------------------------------------------- OpenCLIP
def open_clip_text_tower(state_dict: dict[str, torch.Tensor], oc_config: dict | None, source: str) -> TextTower:
    """An OpenAI CLIP / OpenCLIP state dict (and ``open_clip_config.json``'s contents, when there is one) -> the
    text tower. OpenCLIP pools the highest token id (its end-of-text token has the largest id)."""
    notes = []
    scalars = [k for k in _OPENAI_SCALARS if k in state_dict]
    if scalars:
        notes.append(f"OpenAI's {', '.join(scalars)} entries ignored (not weights)")
    text = {k: v for k, v in state_dict.items() if not k.startswith("visual.") and k not in _OPENAI_SCALARS
            and k not in ("logit_scale", "logit_bias", "attn_mask")}
    if "text.token_embedding.weight" in state_dict or any(k.startswith("text.transformer.") for k in text):
        raise VitlabError(f"{source}: an OpenCLIP model with a custom text tower (text.*: SigLIP / Hugging Face "
                          "text encoders) is not read by vitlab; use the transformers layout of the model")
    if "token_embedding.weight" not in text:
        raise VitlabError(f"{source}: no token_embedding.weight; not an OpenAI CLIP / OpenCLIP state dict with a "
                          "text tower")
    position = text.pop("positional_embedding", None)
    projection = text.pop("text_projection", None)
    text = rename_keys(text, _OPEN_CLIP_TEXT_RULES)
    if position is not None:
        text["pos_embed"] = position.unsqueeze(0)
    if projection is not None:
        text["proj.weight"] = projection.t().contiguous()
    model_cfg = (oc_config or {}).get("model_cfg", oc_config or {})
    text_cfg = model_cfg.get("text_cfg") if isinstance(model_cfg, dict) else None
    text_cfg = text_cfg if isinstance(text_cfg, dict) else {}
    fields = _shape_fields(text, source)
    heads = text_cfg.get("heads") or max(fields["embed_dim"] // 64, 1)  # OpenCLIP's default: 64-wide heads
    if oc_config is None:
        gelu = "quick"
        notes.append("no open_clip_config.json: QuickGELU and 64-wide heads assumed (OpenAI's CLIP); OpenCLIP's "
                     "LAION models use exact GELU")
    else:
        gelu = "quick" if model_cfg.get("quick_gelu") else "exact"
    try:
        config = TextConfig(**fields, num_heads=int(heads), causal=True, pool="argmax", gelu=gelu, norm_eps=1e-5)
    except (TypeError, ValueError) as exc:
        raise VitlabError(f"{source}: the text tower's config is not one vitlab can build ({exc})") from None
    bias = state_dict.get("logit_bias")
    return TextTower(config, text, _scalar(state_dict, "logit_scale", source),
                     None if bias is None else bias.detach().clone().float(), "open_clip", notes, gelu_image=gelu)


def open_clip_preprocessing(pre: Preprocessing, oc_config: dict | None) -> Preprocessing:
    """``pre`` with the mean, std and interpolation of ``open_clip_config.json``'s ``preprocess_cfg`` (OpenCLIP's
    evaluation transform: the shorter side to the model size, centre crop), where it gives them."""
    cfg = (oc_config or {}).get("preprocess_cfg")
    if not isinstance(cfg, dict):
        return pre
    changes = {}
    for name in ("mean", "std"):
        value = cfg.get(name)
        if isinstance(value, list) and len(value) == pre.channels and all(isinstance(v, (int, float)) for v in value):
            changes[name] = tuple(float(v) for v in value)
    if cfg.get("interpolation") in ("bicubic", "bilinear", "nearest"):
        changes["interpolation"] = cfg["interpolation"]
    try:
        return pre.replace(**changes)
    except (TypeError, ValueError) as exc:
        raise VitlabError(f"open_clip_config.json: preprocess_cfg is not a preprocessing vitlab applies ({exc})"
                          ) from None


# ------------------------------------------------------------------------------------------------- files
def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors or ``torch.save`` file (read safely)."""
    kind = sniff(path)
    if kind == "safetensors":
        return read_safetensors(path)[0]
    if kind in ("torch-zip", "torch-legacy"):
        return unwrap_state_dict(read_torch(path), str(path))[0]
    raise VitlabError(f"{path}: a {kind} file; a two-tower checkpoint is a safetensors or torch state dict, or a "
                      "transformers / OpenCLIP model folder")


def image_text_files(path: str | Path) -> tuple[Path, str, dict | None]:
    """(weights file or transformers folder, layout ``hf`` / ``open_clip`` / ``big_vision``, its config) of a
    two-tower checkpoint: a transformers ``CLIPModel`` / ``SiglipModel`` folder, a folder of OpenCLIP files
    (``open_clip_config.json`` + ``open_clip_model.safetensors``), a big_vision ``.npz``, or one weights file (its
    folder's ``config.json`` / ``open_clip_config.json`` describes it when there)."""
    path = Path(path)
    if path.is_dir():
        config = path / "config.json"
        if config.is_file():
            hf = read_json_object(config)
            if hf.get("model_type") not in IMAGE_TEXT_TYPES:
                raise VitlabError(f"{config}: model_type {hf.get('model_type')!r} is not a two-tower image-text "
                                  f"model vitlab reads (one of {', '.join(IMAGE_TEXT_TYPES)})")
            return path, "hf", hf
        for name in OPEN_CLIP_WEIGHTS:
            if (path / name).is_file():
                oc = path / "open_clip_config.json"
                return path / name, "open_clip", read_json_object(oc) if oc.is_file() else None
        raise VitlabError(f"{path}: a folder with neither a transformers config.json nor OpenCLIP weights "
                          f"({', '.join(OPEN_CLIP_WEIGHTS)})")
    if not path.is_file():
        raise VitlabError(f"{path}: no such file or folder")
    if sniff(path) == "npz":  # big_vision's two-tower params (SigLIP's own releases)
        return path, "big_vision", None
    oc, hf = path.parent / "open_clip_config.json", path.parent / "config.json"
    if oc.is_file():
        return path, "open_clip", read_json_object(oc)
    if hf.is_file():
        document = read_json_object(hf)
        if document.get("model_type") in IMAGE_TEXT_TYPES:
            return path, "hf", document
    return path, "auto", None


def read_text_tower(path: str | Path) -> TextTower:
    """The text tower, logit scale and bias of a two-tower checkpoint (see :func:`image_text_files`)."""
    where, layout, config = image_text_files(path)
    source = str(where)
    if layout == "big_vision":
        return big_vision_text_tower(read_npz(where), source)
    state_dict = _read_hf_weights(where) if where.is_dir() else read_state_dict(where)
    if layout == "auto":  # a bare weights file: its keys tell
        if "text_model.embeddings.token_embedding.weight" in state_dict:
            layout = "hf"
            config = {"model_type": "siglip" if "logit_bias" in state_dict else "clip"}
        elif "token_embedding.weight" in state_dict:
            layout = "open_clip"
        else:
            sample = ", ".join(sorted(state_dict)[:5])
            raise VitlabError(f"{source}: no text tower in a layout vitlab reads (transformers text_model.*, "
                              f"OpenAI / OpenCLIP token_embedding.*); first keys: {sample}")
    if layout == "hf":
        return hf_text_tower(state_dict, config, source)
    return open_clip_text_tower(state_dict, config, source)


# ------------------------------------------------------------------------------------------------- writing
_GELU_TO_HF = {"exact": "gelu", "tanh": "gelu_pytorch_tanh", "quick": "quick_gelu"}
_TO_HF_TEXT = [
    (r"token_embed\.weight", "text_model.embeddings.token_embedding.weight"),
    (r"blocks\.(\d+)\.norm([12])\.(weight|bias)", r"text_model.encoder.layers.\1.layer_norm\2.\3"),
    (r"blocks\.(\d+)\.attn\.proj\.(weight|bias)", r"text_model.encoder.layers.\1.self_attn.out_proj.\2"),
    (r"blocks\.(\d+)\.mlp\.fc([12])\.(weight|bias)", r"text_model.encoder.layers.\1.mlp.fc\2.\3"),
    (r"norm\.(weight|bias)", r"text_model.final_layer_norm.\1"),
]
TOKENIZER_SIDE_FILES = ("tokenizer.json", "spiece.model", "tokenizer_config.json", "special_tokens_map.json")


def image_processor_config(pre: Preprocessing, kind: str) -> dict:
    """``preprocessor_config.json`` of transformers' CLIP / SigLIP image processor for ``pre``: a centre crop as
    CLIP's (``shortest_edge`` then ``crop_size``), a squash as SigLIP's (``size`` height / width)."""
    config = {"image_processor_type": "CLIPImageProcessor" if kind == "clip" else "SiglipImageProcessor",
              "do_resize": True, "resample": {"nearest": 0, "bilinear": 2, "bicubic": 3}[pre.interpolation],
              "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(pre.mean),
              "image_std": list(pre.std)}
    if pre.resize == "crop":
        config.update(size={"shortest_edge": round(min(pre.img_size) / pre.crop_pct)}, do_center_crop=True,
                      crop_size={"height": pre.img_size[0], "width": pre.img_size[1]})
    else:
        config.update(size={"height": pre.img_size[0], "width": pre.img_size[1]}, do_center_crop=False)
    return config


def to_transformers_image_text(model) -> tuple[dict[str, torch.Tensor], dict, str]:
    """A vitlab ``ImageTextModel`` -> (the tensors of transformers' ``CLIPModel`` / ``SiglipModel``, its
    ``config.json``, the kind ``clip`` / ``siglip``). Raises InvalidValueError for towers neither class computes."""
    visual_sd = {k: v.detach().cpu().contiguous().clone() for k, v in model.visual.state_dict().items()}
    name = transformers_class(model.visual.cfg)
    tcfg = model.text.cfg
    kind = "siglip" if name and name.startswith("Siglip") else "clip" if name and name.startswith("CLIP") else None
    problems = []
    if kind is None:
        problems.append("the image tower is neither a SigLIP (MAP head) nor a CLIP (ln_pre, projection head) tower")
    elif kind == "clip" and not (tcfg.causal and tcfg.pool in ("eos", "argmax") and tcfg.proj_dim
                                 and not tcfg.proj_bias):
        problems.append("CLIPModel's text tower is causal, pools the end-of-text token and projects without bias")
    elif kind == "siglip" and (tcfg.causal or tcfg.pool != "last" or not tcfg.proj_bias
                               or (model.logit_bias is None)):
        problems.append("SiglipModel's text tower is bidirectional, pools the last position, projects with bias, "
                        "and the model has a logit bias")
    if kind == "clip" and model.logit_bias is not None:
        problems.append("CLIPModel has no logit bias")
    if problems:
        raise InvalidValueError("cannot write the transformers CLIPModel / SiglipModel layout for this model: "
                                + "; ".join(problems))
    vision_tensors, vision_config = to_transformers(visual_sd, model.visual.cfg)
    text_sd = {k: v.detach().cpu().contiguous().clone() for k, v in model.text.state_dict().items()}
    tensors = dict(vision_tensors)
    tensors["text_model.embeddings.position_embedding.weight"] = text_sd.pop("pos_embed")[0].contiguous()
    proj_w, proj_b = text_sd.pop("proj.weight", None), text_sd.pop("proj.bias", None)
    if kind == "clip":
        tensors["text_projection.weight"] = proj_w
    else:
        tensors["text_model.head.weight"], tensors["text_model.head.bias"] = proj_w, proj_b
    text_sd = split_qkv(text_sd, "text_model.encoder.layers.{block}.self_attn.{which}_proj.{kind}", ("q", "k", "v"))
    tensors.update(rename_keys(text_sd, _TO_HF_TEXT))
    shape = () if kind == "clip" else (1,)  # CLIPModel stores a scalar, SiglipModel one-element vectors
    tensors["logit_scale"] = model.logit_scale.detach().cpu().reshape(shape).clone()
    if model.logit_bias is not None:
        tensors["logit_bias"] = model.logit_bias.detach().cpu().reshape(shape).clone()
    vision_config = {k: v for k, v in vision_config.items() if k not in ("architectures", "model_type")}
    text_config = {"vocab_size": tcfg.vocab_size, "hidden_size": tcfg.embed_dim, "intermediate_size": tcfg.mlp_dim,
                   "num_hidden_layers": tcfg.depth, "num_attention_heads": tcfg.num_heads,
                   "max_position_embeddings": tcfg.context_length, "hidden_act": _GELU_TO_HF[tcfg.gelu],
                   "layer_norm_eps": tcfg.norm_eps, "attention_dropout": 0.0}
    if kind == "clip":
        # eos_token_id 2 is the value transformers reads as "pool the highest token id" (OpenAI's rule)
        eos = tcfg.eos_id if tcfg.pool == "eos" and tcfg.eos_id is not None else 2
        text_config.update(eos_token_id=eos, projection_dim=tcfg.proj_dim)
        if tcfg.pad_id is not None:
            text_config["pad_token_id"] = tcfg.pad_id
        config = {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": tcfg.proj_dim,
                  "logit_scale_init_value": float(model.logit_scale.detach().reshape(-1)[0]),
                  "text_config": text_config, "vision_config": vision_config}
    else:
        text_config.update(projection_size=tcfg.proj_dim)
        for field_name, key in (("eos_id", "eos_token_id"), ("pad_id", "pad_token_id")):
            if getattr(tcfg, field_name) is not None:
                text_config[key] = getattr(tcfg, field_name)
        config = {"architectures": ["SiglipModel"], "model_type": "siglip", "text_config": text_config,
                  "vision_config": vision_config}
    return tensors, config, kind


def write_image_text_folder(model, folder: str | Path) -> list[str]:
    """Write ``model`` as a transformers ``CLIPModel`` / ``SiglipModel`` folder (``config.json``,
    ``model.safetensors``, ``preprocessor_config.json``, and the tokenizer's files copied from where it was read),
    replaced atomically; ``transformers`` and :func:`read_text_tower` / ``vitlab.load_image_text`` read it. Returns
    notes."""
    tensors, config, kind = to_transformers_image_text(model)
    pre = getattr(model.visual, "preprocessing", None)
    notes = [f"written as transformers {config['architectures'][0]}"]
    tokenizer = getattr(model, "tokenizer", None)
    source = Path(tokenizer.source).parent if tokenizer is not None and getattr(tokenizer, "source", "") else None
    if tokenizer is None:
        notes.append("no tokenizer: the folder has no tokenizer files")
    with atomic_directory(folder) as tmp:
        write_safetensors(tensors, tmp / "model.safetensors", {"format": "pt"})
        write_json(tmp / "config.json", config)
        if pre is not None:
            write_json(tmp / "preprocessor_config.json", image_processor_config(pre, kind))
        if source is not None:
            for name in TOKENIZER_SIDE_FILES:
                if (source / name).is_file():
                    shutil.copyfile(source / name, tmp / name)
    return notes
