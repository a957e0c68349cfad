"""Knowledge distillation (vitlab.train.distill): the loss against timm's distillation tasks, the teacher's input,
the checks, and training runs with a teacher from Python and the command line."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import timm
import torch
from safetensors.torch import load_file
from timm.task.distillation import LogitDistillationTask
from timm.task.token_distillation import TokenDistillationTask
from torch import nn

import vitlab
from vitlab.cli import main as cli_main
from vitlab.data import build_dataset
from vitlab.errors import VitlabError
from vitlab.labels import class_names, wordnet_ids
from vitlab.preprocessing import Preprocessing
from vitlab.train import TrainConfig, train
from vitlab.train.distill import Distillation, TeacherInput, distillation_loss

from .train_runs import child_env

SMALL = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5)
IMAGENET = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
DIGITS_VIT = {"patch_size": 2, "embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_dim": 64, "pool": "token",
              "class_token": True, "pos_embed": "learned"}


def _pair(student_name: str, vitlab_student: str):
    """A random timm student and teacher (ViT-Ti shapes shrunk) and the same weights as vitlab models; the student
    normalises with ImageNet's mean / std, the teacher with 0.5 / 0.5, as their timm configurations say."""
    torch.manual_seed(0)
    timm_student = timm.create_model(student_name, **SMALL)
    timm_teacher = timm.create_model("vit_tiny_patch16_224", **SMALL)
    with torch.no_grad():  # confident, so that the soft terms are far from zero
        timm_teacher.head.weight.normal_(0, 2.0)
    assert tuple(timm_student.pretrained_cfg["mean"]) == IMAGENET["mean"]
    assert tuple(timm_teacher.pretrained_cfg["mean"]) == (0.5, 0.5, 0.5)
    student = vitlab.create_model(vitlab_student, **SMALL, mlp_dim=128)
    student.load_state_dict(timm_student.state_dict(), strict=True)
    teacher = vitlab.create_model("vit_ti16", **SMALL, mlp_dim=128)
    teacher.load_state_dict(timm_teacher.state_dict(), strict=True)
    teacher.preprocessing = Preprocessing(img_size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    return timm_student, timm_teacher, student, teacher


def _our_loss(student, teacher, images, labels, **config) -> torch.Tensor:
    cfg = TrainConfig(teacher="teacher.safetensors", **config)
    objective = Distillation(cfg, [str(i) for i in range(5)], teacher=teacher)
    objective.check(cfg)
    module = objective.wrap(student, Preprocessing(img_size=32, **IMAGENET)).train()
    x, targets = objective.transform(images, labels)
    return objective.loss(module(x), targets)


@pytest.mark.parametrize("kind, temperature, weight", [("hard", 1.0, 0.5), ("soft", 3.0, 0.1), ("soft", 1.0, 0.7)])
def test_token_distillation_loss_equals_timms(kind, temperature, weight):
    """A distilled student: labels through the class head, the teacher through the distillation head; the teacher
    sees the batch re-normalised from the student's mean / std to its own, as timm's task does."""
    timm_student, timm_teacher, student, teacher = _pair("deit_tiny_distilled_patch16_224", "deit_ti16_distilled")
    images, labels = torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 3, 4, 0])
    task = TokenDistillationTask(timm_student, timm_teacher, criterion=nn.CrossEntropyLoss(label_smoothing=0.1),
                                 distill_type=kind, task_loss_weight=1 - weight, distill_loss_weight=weight,
                                 temperature=temperature, verbose=False).train()
    theirs = task(images, labels)
    ours = _our_loss(student, teacher, images, labels, distill=kind, distill_weight=weight,
                     distill_temperature=temperature, label_smoothing=0.1)
    assert theirs["distill_loss"].item() > 0.1  # the two heads and the teacher really differ
    torch.testing.assert_close(ours, theirs["loss"], atol=1e-5, rtol=1e-5)


def test_logit_distillation_loss_equals_timms():
    """A student without a distillation token learns the labels and the teacher from its one head."""
    timm_student, timm_teacher, student, teacher = _pair("deit_tiny_patch16_224", "deit_ti16")
    images, labels = torch.randn(6, 3, 32, 32), torch.tensor([4, 3, 2, 1, 0, 0])
    task = LogitDistillationTask(timm_student, timm_teacher, criterion=nn.CrossEntropyLoss(), temperature=2.0,
                                 task_loss_weight=0.6, distill_loss_weight=0.4, verbose=False).train()
    ours = _our_loss(student, teacher, images, labels, distill="soft", distill_weight=0.4, distill_temperature=2.0)
    torch.testing.assert_close(ours, task(images, labels)["loss"], atol=1e-5, rtol=1e-5)


def test_the_distillation_terms_are_their_analytic_values():
    student, teacher = torch.tensor([[2.0, 0.0, 0.0]]), torch.tensor([[0.0, 0.0, 5.0]])
    # hard: cross-entropy against the teacher's class 2
    assert distillation_loss(student, teacher, "hard").item() == pytest.approx(2.0 + torch.log(1 + 2 * torch.exp(
        torch.tensor(-2.0))).item(), rel=1e-6)
    # soft: zero when the student matches the teacher; T^2 keeps the small-difference gradient's size
    assert distillation_loss(teacher, teacher, "soft", 4.0).item() == pytest.approx(0.0, abs=1e-7)
    same = torch.tensor([[0.1, 0.0, 0.0]], requires_grad=True)
    grads = []
    for t in (1.0, 10.0):
        (g,) = torch.autograd.grad(distillation_loss(same, torch.zeros(1, 3), "soft", t), same)
        grads.append(g)
    torch.testing.assert_close(grads[0], grads[1], atol=2e-4, rtol=0.02)  # ~ (s - t) / K at any temperature


def test_the_teacher_sees_the_students_images_in_its_own_preprocessing():
    grey = Preprocessing(img_size=16, channels=1, mean=(0.5,), std=(0.5,))
    rgb = Preprocessing(img_size=16, **IMAGENET)
    pixels = torch.rand(2, 1, 16, 16)
    student_batch = (pixels - 0.5) / 0.5
    want = (pixels.repeat(1, 3, 1, 1) - torch.tensor(IMAGENET["mean"]).view(1, 3, 1, 1)) / torch.tensor(
        IMAGENET["std"]).view(1, 3, 1, 1)
    torch.testing.assert_close(TeacherInput(grey, rgb)(student_batch), want)
    assert TeacherInput(rgb, rgb)(want) is want  # the same preprocessing: the batch itself
    # another input size: resized (a flat image stays flat, whatever the interpolation)
    bigger = Preprocessing(img_size=24, interpolation="bicubic", mean=(0.5,), std=(0.5,), channels=1)
    flat = torch.full((1, 1, 16, 16), 0.25)
    torch.testing.assert_close(TeacherInput(grey, bigger)(flat), torch.full((1, 1, 24, 24), 0.25))
    with pytest.raises(VitlabError, match="the teacher takes 3-channel images, the student 4-channel"):
        TeacherInput(Preprocessing(img_size=16, channels=4, mean=(0.5,) * 4, std=(0.5,) * 4), rgb)


def _digits(tmp_path, **changes) -> TrainConfig:
    base = dict(data="digits", model="vit_fmnist", img_size=8, model_args=dict(DIGITS_VIT), epochs=6,
                batch_size=64, lr=3e-3, warmup_steps=5, augment="none", out_dir=str(tmp_path / "runs"), threads=1,
                eval_every_epochs=0, progress=False, log_every_steps=10, save_every_minutes=0)
    base.update(changes)
    return TrainConfig().replace(**base)


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    """A digits classifier trained for a few seconds: the teacher of the runs below."""
    tmp = tmp_path_factory.mktemp("teacher")
    return train(_digits(tmp, epochs=12, run_name="teacher", model_args={**DIGITS_VIT, "embed_dim": 48}))


@pytest.fixture(scope="module")
def shifted_teacher(teacher_run, tmp_path_factory):
    """The teacher with its answers moved one class on (it says 1 where it saw a 0, ..., 0 for a 9), saved under
    the data's class names: what a student learns from it can only have come from the teacher."""
    model = vitlab.load(teacher_run.run_dir)
    with torch.no_grad():
        model.head.weight.copy_(model.head.weight.roll(1, 0))
        model.head.bias.copy_(model.head.bias.roll(1, 0))
    return vitlab.save(model, tmp_path_factory.mktemp("shifted") / "shifted.safetensors",
                       class_names=model.class_names)


def _digits_test() -> tuple[torch.Tensor, torch.Tensor]:
    data = build_dataset("digits", "test")
    return (data.images.float() / 255 - 0.5) / 0.5, data.labels


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(1) == labels).float().mean().item()


def test_a_student_distilled_from_a_teacher_learns_its_answers(tmp_path, teacher_run, shifted_teacher):
    """Trained on the teacher's answers alone (weight 1, soft), a student answers as the shifted teacher does, not
    as the labels say; the same student on the labels learns the labels. The saved model is a plain classifier."""
    images, labels = _digits_test()
    with torch.no_grad():
        teacher_says = vitlab.load(shifted_teacher)(images).argmax(1)
    assert (teacher_says == (labels + 1) % 10).float().mean() > 0.6  # a trained teacher, shifted
    plain = train(_digits(tmp_path, run_name="plain"))
    distilled = train(_digits(tmp_path, run_name="distilled", teacher=str(shifted_teacher), distill="soft",
                              distill_weight=1.0, distill_temperature=2.0))
    with torch.no_grad():
        ours, theirs = distilled.model.eval()(images), plain.model.eval()(images)
    assert _accuracy(theirs, labels) > 0.5 and distilled.metrics["top1"] < 0.15, distilled.metrics
    assert _accuracy(ours, teacher_says) > 0.6, _accuracy(ours, teacher_says)
    saved = vitlab.load(distilled.run_dir)
    torch.testing.assert_close(saved(images[:8]), ours[:8], atol=1e-5, rtol=1e-5)


def test_token_distillation_trains_the_distillation_head_on_the_teacher(tmp_path, shifted_teacher):
    """DeiT's set-up from the command line: hard distillation into the distillation token's head. With the shifted
    teacher, that head learns the teacher's answers and the class head the labels; the saved model averages them."""
    args = ["train", "--data", "digits", "--img-size", "8", "--augment", "none", "--epochs", "8", "--batch-size", "64",
            "--lr", "3e-3", "--threads", "1", "--no-progress", "--out-dir", str(tmp_path / "runs"), "--run-name",
            "deit", "--teacher", str(shifted_teacher), "--distill", "hard", "--distill-weight", "0.5",
            "--set", "model_args=" + json.dumps({**DIGITS_VIT, "distilled": True}), "--set", "eval_every_epochs=0"]
    assert cli_main(args) == 0
    model = vitlab.load(tmp_path / "runs" / "deit")
    images, labels = _digits_test()
    with torch.no_grad():
        tokens = model.forward_features(images)
        class_head, dist_head = model.head(tokens[:, 0]), model.head_dist(tokens[:, 1])
        torch.testing.assert_close(model(images), (class_head + dist_head) / 2)
        teacher_says = vitlab.load(shifted_teacher)(images).argmax(1)
    assert _accuracy(class_head, labels) > 0.5 and _accuracy(dist_head, teacher_says) > 0.5
    assert _accuracy(dist_head, labels) < 0.2 and _accuracy(class_head, teacher_says) < 0.2
    log = (tmp_path / "runs" / "deit" / "log.txt").read_text()
    assert "hard distillation into its distillation head (DeiT's token distillation), weight 0.5" in log
    # the teacher's own accuracy, logged when the run starts: the shifted teacher's is near zero
    with torch.no_grad():
        teacher_top1 = 100 * _accuracy(vitlab.load(shifted_teacher)(images), labels)
    logged = re.search(r"teacher .*shifted.safetensors: test top-1 ([0-9.]+)% \(top-5 [0-9.]+%\) on 359 evaluation "
                       r"images", log)
    assert logged and float(logged.group(1)) == pytest.approx(teacher_top1, abs=0.01) and teacher_top1 < 20
    # ... and kept in result.json (read back from metrics.jsonl, so a resumed run keeps it too)
    teacher = json.loads((tmp_path / "runs" / "deit" / "result.json").read_text())["teacher"]
    assert 100 * teacher["top1"] == pytest.approx(teacher_top1, abs=1e-6) and teacher["samples"] == 359


def test_distillation_is_refused_where_it_cannot_be_right(tmp_path, teacher_run, capsys):
    five = vitlab.save(vitlab.create_model("vit_fmnist", img_size=8, num_classes=5, **DIGITS_VIT),
                       tmp_path / "five.safetensors")
    with pytest.raises(VitlabError, match="predicts 5 classes, the data have 10"):
        train(_digits(tmp_path, teacher=str(five), steps=1))
    renamed = vitlab.load(teacher_run.run_dir)
    vitlab.save(renamed, tmp_path / "renamed.safetensors", class_names=[f"digit {i}" for i in range(10)])
    with pytest.raises(VitlabError, match=re.escape("class 0: 'digit 0' vs '0'")):
        train(_digits(tmp_path, teacher=str(tmp_path / "renamed.safetensors"), steps=1))
    unfinished = tmp_path / "runs" / "unfinished"
    unfinished.mkdir(parents=True)
    (unfinished / "config.json").write_text(TrainConfig().to_json())
    code = cli_main(["train", "--data", "digits", "--teacher", str(unfinished), "--steps", "1",
                     "--out-dir", str(tmp_path / "runs")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and "unfinished: a vitlab run folder without a saved model" in err[0], err
    with pytest.raises(Exception, match="distill = 'warm': takes one of hard, soft"):
        TrainConfig(distill="warm")


def test_resuming_with_another_teacher_under_the_same_name_is_refused(tmp_path, teacher_run):
    path = vitlab.save(vitlab.load(teacher_run.run_dir), tmp_path / "teacher.safetensors")
    train(_digits(tmp_path, teacher=str(path), steps=2, run_name="short"))
    other = vitlab.load(teacher_run.run_dir)
    with torch.no_grad():
        other.head.weight.mul_(2)
    vitlab.save(other, path)
    with pytest.raises(VitlabError, match="the run was distilled from .*teacher.safetensors \\(sha256 [0-9a-f]{64}\\), "
                                          "but .* has sha256 [0-9a-f]{64}; put that teacher back"):
        train(TrainConfig(threads=1), resume=tmp_path / "runs" / "short", steps=4)


def test_an_imagenet_teacher_matches_a_folder_named_by_wordnet_id_and_unnamed_data():
    """The class check is the one ``vitlab eval`` makes: ImageNet names match WordNet-id folders; data that name no
    classes (tar shards without classes.txt) are taken as the teacher's."""
    teacher = vitlab.create_model("vit_ti16", **{**SMALL, "num_classes": 1000}, mlp_dim=64)
    teacher.class_names = class_names("imagenet-1k")
    cfg = TrainConfig(teacher="in1k")
    Distillation(cfg, wordnet_ids("imagenet-1k"), teacher=teacher).check(cfg)
    Distillation(cfg, [str(i) for i in range(1000)], teacher=teacher, named=False).check(cfg)
    swapped = wordnet_ids("imagenet-1k")
    swapped[:2] = swapped[1::-1]
    with pytest.raises(VitlabError, match="class 0: 'tench' vs 'n01443537'"):
        Distillation(cfg, swapped, teacher=teacher).check(cfg)


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_two_processes_distil_as_one_does(tmp_path, shifted_teacher, fsdp):
    """Every process runs its own copy of the teacher on its share of the batch: two processes (DDP, or FSDP with
    the student sharded) train the weights one process trains, token distillation included."""
    cfg = _digits(tmp_path, epochs=2, teacher=str(shifted_teacher), optimizer="sgd", lr=0.05, fsdp=fsdp,
                  model_args={**DIGITS_VIT, "distilled": True}, run_name="two")
    config_file = tmp_path / "config.json"
    config_file.write_text(cfg.to_json())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "vitlab",
           "train", "--config", str(config_file)]
    done = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    one = train(cfg.replace(run_name="one", fsdp=False))
    a, b = load_file(one.model_path), load_file(tmp_path / "runs" / "two" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4, msg=lambda m, k=k: f"{k}: {m}")
