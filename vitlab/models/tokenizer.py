"""Text -> token ids for the text towers (:mod:`vitlab.models.text`), as the checkpoints' own tokenizers do it.

Two kinds of file, read with optional libraries (``pip install 'vitlab[text]'``):

- ``tokenizer.json`` (the ``tokenizers`` library): CLIP's byte-level BPE (lowercased, ``<|startoftext|>`` ...
  ``<|endoftext|>``), SigLIP 2's Gemma tokenizer. The file's normaliser, pre-tokeniser and post-processor (the
  special tokens around a text) apply as transformers 5 applies them; SigLIP 2's tokenizer class (and
  ``do_lower_case``) lowercases first, and Gemma / SigLIP 2 pad on the left unless ``tokenizer_config.json``'s
  ``padding_side`` says otherwise, as transformers' classes do.
- ``spiece.model`` (``sentencepiece``): SigLIP's tokenizer, after transformers' ``SiglipTokenizer`` text
  canonicalisation (lowercased, ASCII punctuation removed, whitespace runs collapsed), then ``</s>``; a special
  token written in the text (``</s>``, ``<unk>``) is that token, as transformers splits on it.

Every text becomes ``context_length`` ids: truncated keeping the closing special token, padded with the pad id (at
the side ``tokenizer_config.json`` names, right by default), as ``tokenizer(texts, padding="max_length",
truncation=True, max_length=context_length)`` gives them in transformers (SigLIP's documented usage; CLIP's causal
tower gives the same embedding whatever follows the end-of-text token).
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ..errors import InvalidValueError, VitlabError

TOKENIZER_FILES = ("tokenizer.json", "spiece.model")
_MISSING = "the text tokenizers need the {} library: pip install 'vitlab[text]'"
_PUNCTUATION = str.maketrans("", "", string.punctuation)
# transformers' tokenizer classes that pad on the left unless tokenizer_config.json says otherwise
_LEFT_PADDING = ("GemmaTokenizer", "GemmaTokenizerFast", "Siglip2Tokenizer")


def _token(value) -> str | None:
    """A special token as transformers saves it: a string, or an ``AddedToken`` dict with ``content``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def read_settings(folder: Path) -> dict:
    """``tokenizer_config.json`` with ``special_tokens_map.json`` under it (each optional), as one dict."""
    settings = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = folder / name
        if path.is_file():
            try:
                document = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise VitlabError(f"{path}: not a readable JSON file ({exc})") from None
            if not isinstance(document, dict):
                raise VitlabError(f"{path}: a JSON {type(document).__name__}, expected an object")
            settings.update(document)
    return settings


def canonicalize_siglip(text: str, lowercase: bool = True) -> str:
    """SigLIP's text canonicalisation (transformers' ``SiglipTokenizer.canonicalize_text``): lowercased, ASCII
    punctuation removed, whitespace runs made one space, stripped."""
    text = text.lower() if lowercase else text
    return re.sub(r"\s+", " ", text.translate(_PUNCTUATION)).strip()


class TextTokenizer:
    """Texts -> a LongTensor (B, ``context_length``) of token ids; see the module docstring.

    ``encode`` turns a list of texts into lists of ids, closing special tokens included and already truncated to
    ``context_length``; padding to the full length is done here."""

    def __init__(self, encode: Callable[[list[str]], list[list[int]]], context_length: int, pad_id: int, *,
                 padding_side: str = "right", source: str = "", kind: str = ""):
        if padding_side not in ("left", "right"):
            raise InvalidValueError(f"{source}: padding_side must be 'left' or 'right', got {padding_side!r}")
        self.encode, self.context_length, self.pad_id = encode, context_length, pad_id
        self.padding_side, self.source, self.kind = padding_side, source, kind

    def __repr__(self) -> str:
        return (f"TextTokenizer({self.kind}, context_length={self.context_length}, pad_id={self.pad_id}, "
                f"source={self.source!r})")

    def __call__(self, texts: Sequence[str] | str) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        bad = [type(t).__name__ for t in texts if not isinstance(t, str)]
        if bad:
            raise InvalidValueError(f"tokenize: texts must be strings, got a {bad[0]}")
        out = torch.full((len(texts), self.context_length), self.pad_id, dtype=torch.long)
        for row, ids in enumerate(self.encode(texts)):
            ids = ids[: self.context_length]
            if self.padding_side == "right":
                out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            elif ids:
                out[row, -len(ids):] = torch.tensor(ids, dtype=torch.long)
        return out


def _length(settings: dict, context_length: int) -> int:
    """The model's context, or the tokenizer's ``model_max_length`` when that is shorter (transformers saves a
    huge sentinel when there is none)."""
    most = settings.get("model_max_length")
    return min(context_length, most) if isinstance(most, int) and 0 < most else context_length


def from_tokenizer_json(path: Path, context_length: int, settings: dict | None = None) -> TextTokenizer:
    """A ``tokenizers`` tokenizer file with the settings of its ``tokenizer_config.json``."""
    try:
        from tokenizers import Tokenizer, normalizers
    except ImportError:
        raise VitlabError(_MISSING.format("tokenizers")) from None
    settings = settings or {}
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as exc:  # the Rust library's errors are plain Exceptions
        raise VitlabError(f"{path}: not a tokenizer file the tokenizers library reads ({exc})") from None
    length = _length(settings, context_length)
    if settings.get("do_lower_case") is True or settings.get("tokenizer_class") == "Siglip2Tokenizer":
        # transformers' Siglip2Tokenizer lowercases (SigLIP 2 was trained on lowercased text)
        tok.normalizer = normalizers.Sequence([normalizers.Lowercase(), *([tok.normalizer] if tok.normalizer
                                                                           else [])])
    eos = _token(settings.get("eos_token"))
    pad = _token(settings.get("pad_token")) or eos
    pad_id = tok.token_to_id(pad) if pad else None
    if pad_id is None:
        pad_id = 0  # OpenCLIP pads with 0
    tok.no_padding()
    tok.enable_truncation(max_length=length)

    def encode(texts: list[str]) -> list[list[int]]:
        return [e.ids for e in tok.encode_batch(texts)]

    side = settings.get("padding_side", "left" if settings.get("tokenizer_class") in _LEFT_PADDING else "right")
    return TextTokenizer(encode, context_length, pad_id, padding_side=side, source=str(path), kind="tokenizer.json")


def from_sentencepiece(path: Path, context_length: int, settings: dict | None = None) -> TextTokenizer:
    """A SentencePiece model as transformers' ``SiglipTokenizer`` uses it (canonicalised text, then ``</s>``)."""
    try:
        import sentencepiece
    except ImportError:
        raise VitlabError(_MISSING.format("sentencepiece")) from None
    settings = settings or {}
    sp = sentencepiece.SentencePieceProcessor()
    try:
        sp.Load(str(path))
    except (OSError, RuntimeError) as exc:
        raise VitlabError(f"{path}: not a SentencePiece model ({exc})") from None
    length = _length(settings, context_length)
    eos = _token(settings.get("eos_token")) or "</s>"
    pad = _token(settings.get("pad_token")) or eos
    eos_id, pad_id = sp.piece_to_id(eos), sp.piece_to_id(pad)
    if sp.id_to_piece(eos_id) != eos or sp.id_to_piece(pad_id) != pad:
        raise VitlabError(f"{path}: the end / pad tokens {eos!r} / {pad!r} are not in the SentencePiece vocabulary")
    lowercase = settings.get("do_lower_case", True)
    specials = {t: sp.piece_to_id(t) for t in {eos, pad, _token(settings.get("unk_token")) or "<unk>"}
                if sp.id_to_piece(sp.piece_to_id(t)) == t}
    # a special token written in the text is that token, whitespace around it dropped (transformers' added tokens)
    split = re.compile(r"\s*(" + "|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True)) + r")\s*")

    unk = _token(settings.get("unk_token")) or "<unk>"
    skip = len(sp.encode(unk))

    def one(text: str) -> list[int]:
        ids = []
        for i, part in enumerate(split.split(text)):
            if i % 2:
                ids.append(specials[part])
            elif part and i == 0:
                ids.extend(sp.encode(canonicalize_siglip(part, lowercase)))
            elif part:  # after a special token: no word-start marker (transformers encodes "<unk>" + text, drops it)
                ids.extend(sp.encode(unk + canonicalize_siglip(part, lowercase))[skip:])
        return ids[: length - 1] + [eos_id]

    def encode(texts: list[str]) -> list[list[int]]:
        return [one(t) for t in texts]

    return TextTokenizer(encode, context_length, pad_id, padding_side=settings.get("padding_side", "right"),
                         source=str(path), kind="spiece.model")


def load_tokenizer(folder: str | Path, context_length: int) -> TextTokenizer | None:
    """The tokenizer in a model folder (``tokenizer.json`` first, else ``spiece.model``), None when it has neither."""
    folder = Path(folder)
    settings = read_settings(folder)
    if (folder / "tokenizer.json").is_file():
        return from_tokenizer_json(folder / "tokenizer.json", context_length, settings)
    if (folder / "spiece.model").is_file():
        return from_sentencepiece(folder / "spiece.model", context_length, settings)
    return None
