"""Knowledge distillation: train a ViT against a frozen, trained teacher as well as against the labels.

``teacher=...`` (``vitlab train --teacher MODEL``) makes :class:`Distillation` the training objective. The teacher
is any classifier :func:`vitlab.load` reads (a checkpoint file, a run folder, a catalog name, an ``hf-hub:`` repo),
trained on the same classes in the same order; it runs in eval mode without gradients, on the same (augmented,
mixed) images as the student, re-normalised to its own mean / std, resized to its own input size and, for a grey
student and an RGB teacher, with the grey channel repeated. Its weights are not part of the run's state: a resumed
run reads the teacher again.

The loss is ``(1 - distill_weight) * label loss + distill_weight * distillation loss``:

- ``distill='hard'`` (DeiT's best, Touvron et al. 2021): cross-entropy against the teacher's top class;
- ``distill='soft'`` (Hinton et al. 2015): ``T^2 * KL(softmax(teacher / T) || softmax(student / T))`` at
  ``T = distill_temperature``.

A student built with a distillation token (``distilled=True``, DeiT's distilled models) learns the labels with its
class head and the teacher with its distillation head, DeiT's token distillation; at inference the two heads'
logits are averaged, as before. Any other student learns both from its one head (logit distillation). The label
loss is the run's softmax cross-entropy (label smoothing, mixup / cutmix targets); evaluation and the saved model
are those of :class:`~vitlab.train.objectives.Classification`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoints.adapter import base_record
from ..errors import VitlabError
from ..evaluate.classmap import wordnet_ids_of
from ..factory import checkpoint_location, load
from ..models import metadata_of
from ..preprocessing import Preprocessing
from .config import TrainConfig
from .objectives import Classification


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str = "hard",
                      temperature: float = 1.0) -> torch.Tensor:
    """The distillation term of the loss, averaged over the batch: ``hard``, cross-entropy of ``student`` logits
    (B, K) against the argmax of ``teacher`` logits (B, K); ``soft``, the KL divergence of the student's
    temperature-``temperature`` softmax from the teacher's, times ``temperature ** 2`` (so that its gradient keeps
    its size as the temperature changes)."""
    student, teacher = student.float(), teacher.float()
    if kind == "hard":
        return F.cross_entropy(student, teacher.argmax(dim=1))
    if kind == "soft":
        log_p_student = F.log_softmax(student / temperature, dim=1)
        log_p_teacher = F.log_softmax(teacher / temperature, dim=1)
        return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * temperature ** 2
    raise VitlabError(f"distill must be hard or soft, got {kind!r}", options=("distill",))


class TeacherInput(nn.Module):
    """Turns the student's input batch into the teacher's: undo the student's normalisation, repeat a grey channel
    for an RGB teacher, resize to the teacher's input size with its interpolation, normalise with its mean / std.
    The identity where the two preprocessings agree."""

    def __init__(self, student: Preprocessing, teacher: Preprocessing):
        super().__init__()
        s_chans, t_chans = len(student.mean), len(teacher.mean)
        if s_chans != t_chans and not (s_chans == 1 and t_chans == 3):
            raise VitlabError(f"the teacher takes {t_chans}-channel images, the student {s_chans}-channel ones; "
                              "distillation needs the same channels (or a grey student and an RGB teacher)",
                              options=("teacher",))
        self.repeat = t_chans // s_chans
        self.size = tuple(teacher.img_size) if tuple(teacher.img_size) != tuple(student.img_size) else None
        self.mode = teacher.interpolation if teacher.interpolation != "nearest" else "nearest-exact"
        self.same_norm = self.repeat == 1 and student.mean == teacher.mean and student.std == teacher.std

        def column(values: Sequence[float]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.float32).view(1, -1, 1, 1)

        self.register_buffer("s_mean", column(student.mean), persistent=False)
        self.register_buffer("s_std", column(student.std), persistent=False)
        self.register_buffer("t_mean", column(teacher.mean), persistent=False)
        self.register_buffer("t_std", column(teacher.std), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.same_norm:
            x = x * self.s_std + self.s_mean  # pixels in [0, 1] (as augmented and mixed)
            if self.repeat > 1:
                x = x.repeat(1, self.repeat, 1, 1)
        if self.size is not None:  # resizing commutes with the per-channel affine normalisation
            smooth = self.mode in ("bilinear", "bicubic")
            x = F.interpolate(x, size=self.size, mode=self.mode, antialias=smooth, align_corners=False if smooth
                              else None)
        if not self.same_norm:
            x = (x - self.t_mean) / self.t_std
        return x


class Distillation(Classification):
    """Classification with a teacher (module docstring): :meth:`transform` runs the teacher on the (mixed) batch
    and passes its logits on with the targets; :meth:`loss` combines the label loss and the distillation loss.
    :meth:`check` refuses a teacher of other classes: another count, or names that differ from the data's (as
    ``vitlab eval`` compares them: ImageNet names match WordNet-id folders); ``named=False`` (data that name no
    classes) compares the count only. ``teacher``: the teacher module itself, instead of loading ``config.teacher``."""

    def __init__(self, config: TrainConfig, class_names: Sequence[str], multi_label: bool = False,
                 teacher: nn.Module | None = None, named: bool = True):
        super().__init__(config, len(class_names), multi_label)
        self.source = config.teacher
        self.kind, self.weight, self.temperature = config.distill, config.distill_weight, config.distill_temperature
        self.class_names = list(class_names)
        self.named = named  # False: the data name no classes (the names are their indices), nothing to compare
        self.teacher = teacher if teacher is not None else load(config.teacher)
        # what the run's checkpoints record, so that a resumed run refuses another teacher under the same name
        self.teacher_record = (base_record(config.teacher, checkpoint_location(config.teacher)) if teacher is None
                               else None)
        self.teacher.eval().requires_grad_(False)
        self.teacher_forward: nn.Module = self.teacher  # compiled by compile()
        self.token = False  # set by wrap: the student has a distillation head of its own
        self.teacher_input: TeacherInput | None = None
        self._device: str | None = None  # where the teacher is (it moves to the batches' device once)

    def check(self, config: TrainConfig) -> None:
        super().check(config)
        if self.loss_name != "softmax":
            raise VitlabError("distillation trains with the softmax loss; multi-label data (loss=sigmoid) cannot "
                              "have a teacher", options=("teacher", "loss"))
        classes = getattr(self.teacher.cfg, "num_classes", 0)
        if classes != len(self.class_names):
            raise VitlabError(f"the teacher {self.source} predicts {classes} classes, the data have "
                              f"{len(self.class_names)}; the teacher must be trained on the same classes",
                              options=("teacher",))
        names = metadata_of(self.teacher).class_names
        if names and self.named and list(names) != self.class_names and wordnet_ids_of(names) != self.class_names:
            differ = next(i for i, (a, b) in enumerate(zip(names, self.class_names)) if a != b)
            raise VitlabError(f"the teacher {self.source} names its classes differently from the data (class "
                              f"{differ}: {names[differ]!r} vs {self.class_names[differ]!r}); the teacher's outputs "
                              "must be the data's classes in the same order", options=("teacher",))

    def wrap(self, model: nn.Module, preprocessing: Preprocessing) -> nn.Module:
        self.teacher_input = TeacherInput(preprocessing, metadata_of(self.teacher).preprocessing)
        self.token = bool(getattr(model.cfg, "distilled", False))
        if self.token:
            model.set_distilled_training(True)  # training forward: (class-head, distillation-head) logits
        return model

    def teacher_module(self, device: torch.device | str) -> nn.Module:
        """The teacher on ``device`` behind its input adapter: the student's batches in, the teacher's logits out
        (moved there once)."""
        if self._device != str(device):
            self.teacher.to(device)
            self.teacher_input.to(device)
            self._device = str(device)
        return nn.Sequential(self.teacher_input, self.teacher)

    def transform(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        images, targets = super().transform(images, targets)
        self.teacher_module(images.device)
        with torch.no_grad():
            teacher_logits = self.teacher_forward(self.teacher_input(images))
        return images, (targets, teacher_logits)

    def loss(self, output, targets: tuple) -> torch.Tensor:
        labels, teacher_logits = targets
        label_out, distill_out = output if self.token else (output, output)
        label_loss = super().loss(label_out, labels)
        distill = distillation_loss(distill_out, teacher_logits, self.kind, self.temperature)
        return (1.0 - self.weight) * label_loss + self.weight * distill

    def compile(self) -> None:
        """``torch.compile`` the teacher's forward too (``compile=true`` runs)."""
        self.teacher_forward = torch.compile(self.teacher)

    def export(self, module: nn.Module) -> nn.Module:
        if self.token:
            module.set_distilled_training(False)  # the saved model's forward: the averaged logits, as at inference
        return module

    def describe(self) -> str:
        """One line for the run log: the teacher, its size and how the student learns from it."""
        params = sum(p.numel() for p in self.teacher.parameters())
        how = "its distillation head (DeiT's token distillation)" if self.token else "its head (logit distillation)"
        kind = f"soft (temperature {self.temperature:g})" if self.kind == "soft" else "hard"
        return (f"distilling from {self.source} ({params / 1e6:.2f}M parameters, frozen): {kind} distillation "
                f"into {how}, weight {self.weight:g}")
