"""The experiment scripts: tables and plots from result rows, resumption by label, and a short end-to-end run of
each script on the 8x8 digits (a few steps, so that the whole pipeline runs in seconds)."""

import json

import pytest

from vitlab.experiments import common, compute, data_requirements, mpp, pooling, posemb


def _row(label, **kw):
    base = {"label": label, "params": 1000, "steps": 10, "epochs": 1.0, "train_tflops": 0.5, "train_seconds": 3.0,
            "wall_seconds": 4.0, "run_dir": "-"}
    base.update(kw)
    return base


def test_markdown_table_formats_accuracy_as_percent_and_counts_with_commas():
    table = common.markdown_table([_row("a", top1=0.91234, params=205962)], [("label", "run"), ("params", "params"),
                                                                             ("top1", "top-1 %")])
    assert table.splitlines()[2] == "| a | 205,962 | 91.23 |"


def test_data_requirements_report_names_the_best_family_per_size(tmp_path):
    rows = [_row(f"{f} / {n}", family=f, model="m", train_images=n, top1=acc)
            for f, n, acc in [("ViT", 1000, 0.70), ("BiT ResNet", 1000, 0.75), ("Hybrid", 1000, 0.74),
                              ("ViT", 60000, 0.86), ("BiT ResNet", 60000, 0.85), ("Hybrid", 60000, 0.87)]]
    data_requirements.report(rows, str(tmp_path))
    text = (tmp_path / "results.md").read_text()
    assert "1,000 images: best BiT ResNet (75.00%)" in text and "60,000 images: best Hybrid (87.00%)" in text
    assert (tmp_path / "data_requirements.png").stat().st_size > 1000


def test_pooling_report_picks_learning_rate_on_the_holdout_not_the_test_set(tmp_path):
    rows = [_row("class token / lr 0.001", head="class token", lr=1e-3, val_top1=0.80, top1=0.79),
            _row("class token / lr 0.004", head="class token", lr=4e-3, val_top1=0.78, top1=0.81),
            _row("GAP / lr 0.001", head="GAP", lr=1e-3, val_top1=0.83, top1=0.82)]
    best = pooling.best_per_head(rows)
    assert best["class token"]["lr"] == 1e-3 and best["GAP"]["lr"] == 1e-3
    pooling.report([rows[2], rows[1], rows[0]], str(tmp_path))  # a wider grid run later appends rows
    text = (tmp_path / "results.md").read_text()
    assert "(GAP - class token): +3.00 points" in text
    table = [line.split(" | ")[:2] for line in text.splitlines() if line.startswith("| ")][1:]
    assert table == [["| class token", "0.001"], ["| class token", "0.004"], ["| GAP", "0.001"]]  # head, then lr


def test_posemb_and_compute_reports(tmp_path):
    rows = [_row(t, pos_embed=k, model="m", top1=0.8 + 0.01 * i) for i, (k, t) in enumerate(posemb.KINDS)]
    posemb.report(rows, str(tmp_path))
    assert "1D learned +1.00" in (tmp_path / "results.md").read_text()
    rows = [_row(label, family=family, model=model, top1=0.8, train_tflops=0.1 * (i + 1))
            for i, (family, label, model, _) in enumerate(compute.MODELS)]
    compute.report(rows, str(tmp_path))
    assert (tmp_path / "compute.png").is_file()


def test_results_are_resumed_by_label(tmp_path):
    (tmp_path / "results.json").write_text(json.dumps({"rows": [_row("done", top1=0.5)]}))
    logged = []
    rows = common.run_series([common.Run("done", config=None)], tmp_path, log=logged.append)
    assert rows == [_row("done", top1=0.5)] and "already in" in logged[0]


@pytest.mark.slow
@pytest.mark.parametrize("script,extra", [  # posemb: tests/test_experiment_cli.py
    (pooling, ["--lrs", "1e-3", "--holdout", "300"]),
    (data_requirements, ["--sizes", "256"]),
    (compute, ["--only", "ViT w32 d4", "BiT 1-1-1"]),
    (compute, ["--models", "vit_fmnist", "r_vit_fmnist"]),
    (mpp, ["--pretrain-steps", "3", "--labels", "256"]),
])
def test_each_experiment_runs_end_to_end_on_digits(tmp_path, script, extra):
    pytest.importorskip("sklearn")
    out = tmp_path / "out"
    assert script.main(["--out", str(out), "--steps", "2", "--data", "digits", "--threads", "1", *extra]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert rows and all(r["top1"] is not None for r in rows)
    if "--models" in extra:  # registered names: one row each, the family read from the model's config
        assert [(r["label"], r["family"]) for r in rows] == [("vit_fmnist", "ViT"), ("r_vit_fmnist", "Hybrid")]
    assert (out / "results.md").is_file() and list(out.glob("*.png"))


def test_training_subsets_are_balanced_nested_and_disjoint_from_the_holdout():
    import torch

    from vitlab.data import ArrayDataset
    from vitlab.errors import VitlabError
    from vitlab.train.run import split_training_set

    index = torch.arange(1000)
    images = torch.zeros(1000, 1, 2, 2, dtype=torch.uint8)
    images[:, 0, 0, 0], images[:, 0, 0, 1] = index // 256, index % 256  # each image spells its own index
    data = ArrayDataset(images, index % 10, [str(i) for i in range(10)])

    def ids(ds):
        return set((ds.images[:, 0, 0, 0].long() * 256 + ds.images[:, 0, 0, 1].long()).tolist())

    small, held = split_training_set(data, 100, 200, seed=3)
    large, held_again = split_training_set(data, 500, 200, seed=3)
    assert torch.bincount(small.labels).tolist() == [10] * 10 and torch.bincount(held.labels).tolist() == [20] * 10
    assert ids(small) < ids(large) and not ids(large) & ids(held) and ids(held) == ids(held_again)
    assert ids(split_training_set(data, 100, 200, seed=4)[0]) != ids(small)  # the seed picks the images
    rest, _ = split_training_set(data, None, 200, seed=3)
    assert len(rest) == 800 and ids(rest) == set(range(1000)) - ids(held)
    with pytest.raises(VitlabError, match="train_subset must be between 1 and 800"):
        split_training_set(data, 900, 200, seed=0)
