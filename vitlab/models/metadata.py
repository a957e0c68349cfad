"""What a model's weights come with besides the weights: the evaluation preprocessing of their source, the class
names of the head and the loss it was trained with.

Model classes declare the three as attributes (:class:`ModelMetadata`, None until a loader or a training run sets
them); every layer reads them through :func:`metadata_of`, which also serves models that do not declare them
(wrappers, ONNX sessions, models of other libraries) and supplies the paper's preprocessing when none is known.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..preprocessing import Preprocessing


class ModelMetadata:
    """The metadata attributes a vitlab model class declares (class-level defaults, set per instance)."""

    #: the evaluation preprocessing of the weights' source (None: not known; the paper's is used)
    preprocessing: Preprocessing | None = None
    #: one name per output of the head (None: not known, or a new head)
    class_names: list[str] | None = None
    #: the loss the head was trained with, "softmax" or "sigmoid" (per-label probabilities); None: not known
    loss: str | None = None


@dataclass(frozen=True)
class ModelMeta:
    """A model's metadata as :func:`metadata_of` resolves it."""

    preprocessing: Preprocessing  # the stored one, else the paper's default for the model's input size
    class_names: list[str] | None
    loss: str | None
    preprocessing_known: bool  # False: nothing stored; ``preprocessing`` is the paper's default


def metadata_of(model) -> ModelMeta:
    """The preprocessing, class names and loss of ``model`` (any object with a ``cfg`` giving ``img_size`` and
    ``in_chans``); the one place that supplies what a model does not carry."""
    # getattr: wrappers (torch.compile, peft, ONNX sessions) and models of other families may not declare them
    stored = getattr(model, "preprocessing", None)
    if stored is None:
        cfg = model.cfg
        preprocessing = Preprocessing.for_model(cfg.img_size, cfg.in_chans)
    else:
        preprocessing = stored
    return ModelMeta(preprocessing, getattr(model, "class_names", None), getattr(model, "loss", None),
                     stored is not None)
