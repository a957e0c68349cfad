"""Contrastive image-text fine-tuning (vitlab.train.contrastive, ``vitlab finetune-image-text``): the losses against
a hand computation and transformers' ``return_loss=True``, training through the loop on a tiny captioned set,
locking, exact resume, the two-tower output and the refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vitlab
from vitlab.errors import VitlabError
from vitlab.train.contrastive import ContrastiveObjective, contrastive_loss, finetune_image_text

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

# eight images, two captions each (words of the fixtures' tokenizer); the test split repeats the first caption
CAPTIONS = [("a small cat", "a photo of a small cat"), ("a large cat", "a photo of a large cat"),
            ("a small dog", "a photo of a small dog"), ("a large dog", "a photo of a large dog"),
            ("a small car", "a photo of a small car"), ("a large race car", "a photo of a race car"),
            ("a blurry cat", "a drawing of a cat"), ("a blurry dog", "a drawing of a dog")]


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    from .image_text_fixtures import clip_folder

    return clip_folder(tmp_path_factory.mktemp("contrastive") / "clip")


@pytest.fixture(scope="module")
def siglip(tmp_path_factory):
    from .image_text_fixtures import siglip_folder

    return siglip_folder(tmp_path_factory.mktemp("contrastive") / "siglip")


@pytest.fixture(scope="module")
def captions(tmp_path_factory):
    """A captions manifest: each image's two captions in the train split, its first one in the test split."""
    import csv

    from PIL import Image

    root = tmp_path_factory.mktemp("captions")
    rng = np.random.default_rng(0)
    rows = []
    for i, texts in enumerate(CAPTIONS):
        # a colour per image, with noise: images the tiny towers can tell apart
        base = rng.integers(0, 256, 3)
        pixels = np.clip(base + rng.normal(0, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / f"img{i}.png")
        rows += [[f"img{i}.png", t, "train"] for t in texts] + [[f"img{i}.png", texts[0], "test"]]
    path = root / "captions.csv"
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["image", "caption", "split"])
        out.writerows(rows)
    return path


def _config(tmp_path, source, data, **changes):
    values = dict(data=str(data), init_from=str(source), optimizer="adamw", lr=3e-3, weight_decay=0.0,
                  schedule="constant", warmup_steps=0, steps=12, epochs=None, batch_size=4, augment="none",
                  flip=False, grad_clip=1.0, eval_every_epochs=1.0, precision="fp32", out_dir=str(tmp_path),
                  run_name="run", seed=1, progress=False, log_every_steps=1)
    values.update(changes)
    return vitlab.train.TrainConfig().replace(**values)


# ------------------------------------------------------------------------------------------------------ losses
def _batch(pair, ref, n=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 32, 32, generator=gen)
    tokens = pair.tokenize([t for t, _ in CAPTIONS[:n]])
    return images, tokens


def test_clip_loss_equals_cross_entropy_both_ways_and_transformers(clip):
    ref, folder = clip
    pair = vitlab.load_image_text(folder)
    images, tokens = _batch(pair, ref)
    with torch.no_grad():
        img, txt = pair.encode_image(images), pair.encode_text(tokens)
        ours = contrastive_loss(img, txt, pair.logit_scale, None, "softmax")
        logits = pair.logit_scale.exp() * img @ txt.T  # e^2 < 100: the clip does nothing here
        hand = sum(-F.log_softmax(m, dim=1).diagonal().mean() for m in (logits, logits.T)) / 2
        theirs = ref(input_ids=tokens, pixel_values=images, return_loss=True).loss
    torch.testing.assert_close(ours, hand, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    # the scale is clipped at 100: a larger logit scale gives the loss at 100, and no gradient to the scale
    scale = torch.tensor(6.0, requires_grad=True)
    clipped = contrastive_loss(img, txt, scale, None, "softmax")
    at_100 = contrastive_loss(img, txt, torch.tensor(float(np.log(100.0))), None, "softmax")
    torch.testing.assert_close(clipped, at_100, rtol=1e-6, atol=1e-6)
    clipped.backward()
    assert scale.grad == 0


def test_siglip_loss_equals_pairwise_sigmoid_and_transformers(siglip):
    ref, folder = siglip
    pair = vitlab.load_image_text(folder)
    images, tokens = _batch(pair, ref, n=5, seed=1)
    with torch.no_grad():
        img, txt = pair.encode_image(images), pair.encode_text(tokens)
        ours = contrastive_loss(img, txt, pair.logit_scale, pair.logit_bias, "sigmoid")
        logits = (pair.logit_scale.exp() * img @ txt.T + pair.logit_bias).double()
        hand = 0.0
        for i in range(5):
            for j in range(5):
                z = 1.0 if i == j else -1.0
                hand -= float(torch.log(torch.sigmoid(z * logits[i, j])))
        theirs = ref(input_ids=tokens, pixel_values=images, return_loss=True).loss
    assert abs(float(ours) - hand / 5) < 1e-5
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    with pytest.raises(VitlabError, match="needs a model with a logit bias"):
        contrastive_loss(img, txt, pair.logit_scale, None, "sigmoid")


@pytest.mark.slow  # ~15 s: two spawned processes import vitlab
def test_gathered_loss_over_two_processes_is_the_global_batch_loss_and_gradient():
    import socket

    import torch.multiprocessing as mp

    from tests.contrastive_gather import gather_worker, global_pairs

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(gather_worker, args=(2, port, results), nprocs=2, join=True)
    img, txt = global_pairs()
    for kind in ("softmax", "sigmoid"):
        g_img, g_txt = img.clone().requires_grad_(), txt.clone().requires_grad_()
        scale, bias = torch.tensor(1.5, requires_grad=True), torch.tensor(-2.0, requires_grad=True)
        loss = contrastive_loss(g_img, g_txt, scale, bias, kind)
        loss.backward()
        shares = [results[r][kind] for r in range(2)]
        # DDP averages the processes' gradients: the mean of the shares is the global batch's loss and gradient
        assert abs(np.mean([s[0] for s in shares]) - loss.item()) < 1e-6
        torch.testing.assert_close(torch.cat([s[1] for s in shares]) / 2, g_img.grad, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(torch.cat([s[2] for s in shares]) / 2, g_txt.grad, rtol=1e-5, atol=1e-7)
        assert abs(np.mean([s[3] for s in shares]) - float(scale.grad)) < 1e-6
        assert abs(np.mean([s[4] for s in shares]) - float(bias.grad if kind == "sigmoid" else 0.0)) < 1e-6


# ------------------------------------------------------------------------------------------- through the loop
def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow  # ~10 s on the 2-core CPU
def test_clip_fine_tuning_lowers_the_loss_raises_recall_and_writes_both_towers(clip, captions, tmp_path):
    ref, folder = clip
    before = ContrastiveObjective()
    cfg = _config(tmp_path, folder, captions, steps=24, eval_every_epochs=6)
    result = finetune_image_text(cfg, objective=before)
    rows = _rows(result.run_dir)
    losses = [r["loss"] for r in rows if r["kind"] == "step"]
    assert np.mean(losses[-4:]) < 0.7 * np.mean(losses[:4])
    evals = [r for r in rows if r["kind"] == "eval"]
    assert result.metrics["samples"] == 8 and result.metrics["texts"] == 8
    # recall@1 before training (the random model) against after it
    from vitlab.data.captions import build_captioned
    from vitlab.evaluate.retrieval import evaluate_retrieval

    data = build_captioned(captions, ("test",))
    data.transform = vitlab.load_image_text(folder).preprocessing.transform()
    start = evaluate_retrieval(vitlab.load_image_text(folder), data, ks=(1,))
    start_r1 = (start["image_to_text"]["recall@1"] + start["text_to_image"]["recall@1"]) / 2
    assert result.metrics["top1"] >= start_r1 + 0.25, (start_r1, result.metrics)
    assert evals[-1]["top1"] == result.metrics["top1"]
    # the two-tower folder: vitlab and transformers read it, and give the trained model's embeddings
    tuned = vitlab.load_image_text(result.image_text)
    after = evaluate_retrieval(tuned, data, ks=(1,))
    assert (after["image_to_text"]["recall@1"] + after["text_to_image"]["recall@1"]) / 2 == result.metrics["top1"]
    back = transformers.CLIPModel.from_pretrained(result.image_text).eval()
    images = torch.randn(2, 3, 32, 32)
    tokens = tuned.tokenize(["a small cat", "a large dog"])
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=tokens, pixel_values=images).logits_per_image,
                                   tuned(images, tokens), rtol=1e-5, atol=1e-5)
        # model.safetensors: the image tower alone, the same weights
        tower = vitlab.load(result.model_path)
        torch.testing.assert_close(tower(images), tuned.visual(images), rtol=1e-6, atol=1e-6)


def _state(pair):
    return {k: v.clone() for k, v in pair.state_dict().items()}


@pytest.mark.parametrize("lock", ["image", "text"])
def test_locks_keep_exactly_what_they_name(siglip, captions, tmp_path, lock):
    ref, folder = siglip
    start = _state(vitlab.load_image_text(folder))
    objective = ContrastiveObjective(lock_image=lock == "image", lock_text=lock == "text")
    finetune_image_text(_config(tmp_path, folder, captions, steps=3, eval_every_epochs=0), objective=objective)
    assert objective.kind == "sigmoid"  # auto: SigLIP's loss for a model with a logit bias
    end = objective.pair.state_dict()
    locked = "visual." if lock == "image" else "text."
    for name, value in end.items():
        if name.startswith(locked):
            assert torch.equal(value, start[name]), name
    trained = [n for n in end if not n.startswith(locked) and not torch.equal(end[n], start[n])]
    assert any(n.startswith("text." if lock == "image" else "visual.") for n in trained)
    assert "logit_scale" in trained and "logit_bias" in trained


def test_locked_logit_scale_and_both_towers(clip, captions, tmp_path):
    ref, folder = clip
    start = _state(vitlab.load_image_text(folder))
    objective = ContrastiveObjective(lock_image=True, lock_logit_scale=True)
    finetune_image_text(_config(tmp_path, folder, captions, steps=2, eval_every_epochs=0), objective=objective)
    assert torch.equal(objective.pair.logit_scale, start["logit_scale"])
    # resumed with other locks: refused in one line before anything is loaded into the model
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    with pytest.raises(VitlabError, match="trained with .'lock_image': True.*resume with the same settings"):
        finetune_image_text(_config(tmp_path, folder, captions), resume=str(last), steps=4)
    with pytest.raises(VitlabError, match="nothing would train"):
        finetune_image_text(_config(tmp_path, folder, captions, steps=2, run_name="none"),
                            objective=ContrastiveObjective(True, True, True))


@pytest.mark.slow  # ~10 s: three short runs
def test_resume_equals_an_uninterrupted_run(clip, captions, tmp_path, monkeypatch):
    import os
    import signal

    from tests.train_runs import same_tensors
    from vitlab.train import loop
    from vitlab.train.stop import RunStopped

    cfg = _config(tmp_path, clip[1], captions, steps=6, eval_every_epochs=1.5)
    whole = finetune_image_text(cfg)
    real_step = loop.train_step

    def signalled_step(run, batches, step):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(run, batches, step)

    monkeypatch.setattr(loop, "train_step", signalled_step)
    with pytest.raises(RunStopped):
        finetune_image_text(cfg.replace(run_name="stopped"), resume="auto")
    monkeypatch.setattr(loop, "train_step", real_step)
    resumed = finetune_image_text(cfg.replace(run_name="stopped"), resume="auto")
    assert same_tensors(resumed.image_text / "model.safetensors", whole.image_text / "model.safetensors") == []
    assert same_tensors(resumed.model_path, whole.model_path) == []


# ------------------------------------------------------------------------------------------------- refusals
def test_one_line_errors(clip, captions, tmp_path):
    import csv

    ref, folder = clip
    labelled = tmp_path / "labels.csv"
    with open(labelled, "w", newline="") as f:
        csv.writer(f).writerows([["image", "label"], [str(captions.parent / "img0.png"), "cat"]])
    with pytest.raises(VitlabError, match="no text column"):
        finetune_image_text(_config(tmp_path, folder, labelled))
    vit = tmp_path / "vit.safetensors"
    vitlab.save(vitlab.create_model("vit_ti16", img_size=32, patch_size=8, depth=1, num_classes=3), vit)
    with pytest.raises(VitlabError, match="not an image-text model"):
        finetune_image_text(_config(tmp_path, vit, captions))
    with pytest.raises(VitlabError, match="loss=sigmoid"):
        finetune_image_text(_config(tmp_path, folder, captions, loss="sigmoid"))
    with pytest.raises(VitlabError, match="does not support mixup"):
        finetune_image_text(_config(tmp_path, folder, captions, mixup=0.2))


def test_command_writes_a_model_zero_shot_and_retrieval_take(siglip, captions, tmp_path, capsys):
    from vitlab.cli import main

    ref, folder = siglip
    common = ["--data", str(captions), "--steps", "2", "--batch-size", "4", "--augment", "none", "--precision",
              "fp32", "--out-dir", str(tmp_path), "--no-progress"]
    assert main(["finetune-image-text", "--from", str(folder), "--lock-image", "--run-name", "cli", *common]) == 0
    out = capsys.readouterr().out
    assert "held-out retrieval: image -> text R@1 " in out and "on 8 images, 8 captions" in out
    tuned = tmp_path / "cli" / "image_text"
    assert f"image-text model: {tuned}" in out
    assert main(["eval", str(tuned), "--retrieval", "--data", str(captions)]) == 0
    assert main(["zero-shot", str(tuned), "--classes", "cat,dog", "--out", str(tmp_path / "clf.safetensors")]) == 0
    transformers.SiglipModel.from_pretrained(tuned)
    # refused in one line: no --from, a data set without captions, a classification option
    capsys.readouterr()
    assert main(["finetune-image-text", *common]) == 2
    assert capsys.readouterr().err.strip().endswith("give --from MODEL (the CLIP / SigLIP model to fine-tune)")
    assert main(["finetune-image-text", "--from", str(folder), *common, "--label-smoothing", "0.1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not support" in err, err


def test_a_manifest_without_a_split_column_trains_on_every_row_and_evaluates_nothing(clip, captions, tmp_path):
    import csv

    rows = [r for r in csv.reader(captions.read_text().splitlines()) if r[2] == "train"]
    plain = captions.parent / "no_split.csv"
    with open(plain, "w", newline="") as f:
        csv.writer(f).writerows([["image", "caption"], *[r[:2] for r in rows]])
    objective = ContrastiveObjective()
    result = finetune_image_text(_config(tmp_path, clip[1], plain, steps=1), objective=objective)
    assert result.metrics == {} and len(objective.train_data.texts) == 16
    assert vitlab.load_image_text(result.image_text).tokenizer is not None
