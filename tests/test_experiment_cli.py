"""`vitlab experiment NAME` and `vitlab.experiments.run`: one row per setting, table cells and plot from the runs,
clear errors for bad options."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vitlab
from vitlab.cli import main as cli_main
from vitlab.errors import VitlabError
from vitlab.experiments import TRAINING, compute, options, posemb, run


def _table_rows(markdown: str) -> list[list[str]]:
    lines = [line for line in markdown.splitlines() if line.startswith("| ")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[1:]]  # without the heading


@pytest.mark.slow
def test_cli_posemb_writes_one_row_per_kind_whose_accuracy_is_the_saved_model_s(tmp_path, capsys):
    pytest.importorskip("sklearn")
    from vitlab.train import evaluate

    out = tmp_path / "posemb"
    assert cli_main(["experiment", "posemb", "--out", str(out), "--steps", "3", "--data", "digits",
                     "--threads", "1"]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["pos_embed"] for r in rows] == [k for k, _ in posemb.KINDS]
    assert all(r["steps"] == 3 for r in rows)
    # each run saved its model: evaluating it again gives the row's accuracy, and the table shows that number
    table = _table_rows((out / "results.md").read_text())
    assert [t[0] for t in table] == [title for _, title in posemb.KINDS]
    for row, cells in zip(rows, table):
        model = vitlab.load(f"{row['run_dir']}/model.safetensors")
        assert evaluate(model, "digits", "test", device="cpu")["top1"] == pytest.approx(row["top1"], abs=1e-6)
        assert cells[4] == f"{100 * row['top1']:.2f}"
    # the 1D / 2D learned tables change the parameter count by their size, none and sin-cos add no parameters
    params = {r["pos_embed"]: r["params"] for r in rows}
    assert params["sincos"] == params["none"] < params["learned_2d"] < params["learned"]
    assert (out / "posemb.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| position embedding |" in capsys.readouterr().out


def test_python_run_redraws_from_results_json_without_training(tmp_path):
    rows = [{"label": label, "family": family, "model": model, "params": 100 * (i + 1), "steps": 5, "epochs": 1.0,
             "train_tflops": 0.1 * (i + 1), "train_seconds": 1.0, "wall_seconds": 2.0, "run_dir": "-",
             "top1": 0.5 + 0.05 * i} for i, (family, label, model, _) in enumerate(compute.MODELS)]
    (tmp_path / "results.json").write_text(json.dumps({"rows": rows}))
    assert run("compute", out=str(tmp_path), plot_only=True) == rows
    table = _table_rows((tmp_path / "results.md").read_text())
    assert len(table) == len(compute.MODELS)
    assert [t[5] for t in table] == [f"{100 * r['top1']:.2f}" for r in rows]  # sorted by compute = given order
    assert (tmp_path / "compute.png").stat().st_size > 1000


def test_python_run_rejects_unknown_experiments_and_options(tmp_path):
    with pytest.raises(VitlabError, match="unknown experiment 'fig99'"):
        run("fig99")
    with pytest.raises(VitlabError, match="unknown option.*lr_grid"):
        run("pooling", out=str(tmp_path), lr_grid=[1e-3])
    with pytest.raises(VitlabError, match="--steps must be at least 1"):
        run("posemb", out=str(tmp_path), steps=0)
    assert not list(tmp_path.iterdir())  # nothing written


def test_every_experiment_has_bounded_cpu_defaults():
    for name in TRAINING:
        args = options(name)
        assert args.data == "fashion-mnist" and 0 < args.steps <= 300, name
    assert options("mpp").pretrain_steps == 600 and options("data_requirements").sizes == [1000, 6000, 60000]


def test_cli_plot_only_without_results_is_a_one_line_error(tmp_path, capsys):
    assert cli_main(["experiment", "pooling", "--plot-only", "--out", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no results yet" in err and "results.json" in err
    with pytest.raises(SystemExit):
        cli_main(["experiment", "fig99"])


@pytest.mark.parametrize("name,folder", [(n, n) for n in TRAINING] + [("data_requirements", "data_requirements_1200")])
def test_docs_tables_are_the_tables_of_the_recorded_results(tmp_path, name, folder):
    """docs/experiments.md shows, for each recorded experiment run, the table its results.json renders to."""
    from pathlib import Path

    docs = Path(__file__).resolve().parent.parent / "docs"
    recorded = docs / "experiments" / folder / "results.json"
    (tmp_path / "results.json").write_text(recorded.read_text())
    rows = run(name, out=str(tmp_path), plot_only=True)
    tuned = [r for r in rows if r["label"] not in ("MPP pre-training", "MAE pre-training")]
    assert tuned and all(r["top1"] is not None for r in tuned)
    table = "\n".join(line for line in (tmp_path / "results.md").read_text().splitlines() if line.startswith("|"))
    assert len(table.splitlines()) == len(tuned) + 2
    assert table in (docs / "experiments.md").read_text()


# ------------------------------------------------------------------------------------------ families (Fig. 7)
def _family_checkpoints(tmp_path):
    """Three small random-weight checkpoints of different families: a distilled DeiT in vitlab's format (class and
    distillation tokens, both with position-embedding rows), timm state dicts of a DINOv2 with 4 registers
    (position embedding over the patches only) and of a SigLIP (no class token, attention pooling)."""
    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file

    from .checkpoint_fixtures import randomize_weights_

    deit = randomize_weights_(vitlab.create_model("deit_s16_distilled", img_size=32, patch_size=8, embed_dim=32,
                                                  depth=2, num_heads=2, mlp_dim=64, num_classes=3), seed=1)
    paths = {"deit": vitlab.save(deit, tmp_path / "deit.safetensors")}
    small = dict(img_size=28, patch_size=7, embed_dim=128, depth=2, num_heads=2, mlp_ratio=2.0)  # 128/64: 2 heads
    for name, fn, extra in [("dinov2", "vit_small_patch14_reg4_dinov2", {}),
                            ("siglip", "vit_base_patch16_siglip_224", {"act_layer": "gelu_tanh"})]:
        theirs = randomize_weights_(timm.create_model(fn, pretrained=False, num_classes=0, **small, **extra), seed=2)
        paths[name] = tmp_path / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in theirs.state_dict().items()}, str(paths[name]))
    return paths


def test_families_numbers_are_the_inspection_functions_on_each_model(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from vitlab.inspect import find_images, load_images, mean_attention_distance, position_embedding_similarity
    from vitlab.preprocessing import Preprocessing

    paths = _family_checkpoints(tmp_path)
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):  # another size than any model's: each model's preprocessing resizes
        Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    out = tmp_path / "out"
    assert cli_main(["experiment", "families", "--models", *map(str, paths.values()), "--labels", *paths,
                     "--images", str(folder), "--out", str(out), "--batch-size", "2"]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["label"] for r in rows] == list(paths)
    with np.load(out / "families.npz") as data:
        arrays = {key: data[key] for key in data.files}
    for i, (row, path) in enumerate(zip(rows, paths.values())):
        model = vitlab.load(path)
        cfg = model.cfg
        pre = getattr(model, "preprocessing", None) or Preprocessing.for_model(cfg.img_size, cfg.in_chans)
        images = load_images(find_images(folder), pre)
        with torch.no_grad():
            _, maps = model.forward_with_attention(images)
        expected = mean_attention_distance(maps, cfg.grid_size, cfg.patch_size, cfg.num_prefix_tokens)
        torch.testing.assert_close(torch.from_numpy(arrays[f"{i}/attention_distance"]), expected, rtol=1e-5,
                                   atol=1e-5)
        assert np.allclose(row["distance_table"], expected.numpy(), atol=1e-4)
        assert row["num_prefix_tokens"] == cfg.num_prefix_tokens and row["num_images"] == 3
        # the similarity grid holds the patches only: prefix rows of the embedding (if any) are left out
        gh, gw = cfg.grid_size
        pos = model.pos_embed[0].detach().double()
        assert pos.shape[0] == cfg.num_pos_prefix + gh * gw
        unit = torch.nn.functional.normalize(pos[cfg.num_pos_prefix:], dim=-1)
        by_hand = (unit @ unit.T).reshape(gh, gw, gh, gw).float()
        torch.testing.assert_close(torch.from_numpy(arrays[f"{i}/posemb_similarity"]), by_hand)
        torch.testing.assert_close(position_embedding_similarity(model), by_hand)
        assert row["posemb_grid"] == [gh, gw]
    assert [(r["prefix_tokens"], r["num_pos_prefix"], r["pool"]) for r in rows] == [
        (["class", "dist"], 2, "token"), (["class", "reg0", "reg1", "reg2", "reg3"], 0, "token"), ([], 0, "map")]
    table = _table_rows((out / "results.md").read_text())
    assert [t[0] for t in table[:3]] == list(paths)
    assert table[0][5] == f"{sum(rows[0]['distance_table'][0]) / 2:.3g}"  # layer 1 mean of the 2 heads
    png = (out / "families.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    # --plot-only redraws from results.json and families.npz without loading a checkpoint
    (out / "families.png").unlink()
    for path in paths.values():
        path.unlink()
    assert run("families", out=str(out), plot_only=True) == rows
    assert (out / "families.png").stat().st_size > 1000
    assert "| model |" in capsys.readouterr().out


def test_families_default_images_and_bad_options(tmp_path, capsys):
    pytest.importorskip("sklearn")
    from vitlab.experiments import families

    crops = families.gather_images("sample-photos", 3)
    assert len(crops) == 3 and all(c.size[0] == c.size[1] >= 256 for c in crops)
    assert [c.tobytes() for c in families.gather_images("sample-photos", 3)] == [c.tobytes() for c in crops]
    digits = families.gather_images("digits", 2)
    assert [d.size for d in digits] == [(8, 8), (8, 8)]
    assert families.checkpoint_spec("dinov2_l14") == "dinov2_l14.lvd142m"
    assert families.checkpoint_spec("vit_large_patch16_224") == "vit_l16.augreg_in21k_ft_in1k"
    assert families.checkpoint_spec("vit_l16.augreg_in21k") == "vit_l16.augreg_in21k"
    assert cli_main(["experiment", "families", "--out", str(tmp_path / "o")]) == 2
    assert "--models: give at least one checkpoint" in capsys.readouterr().err
    assert cli_main(["experiment", "families", "--models", "a", "b", "--labels", "x", "--out",
                     str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--labels: need 2 distinct labels" in err
    cnn = vitlab.save(vitlab.create_model("bit_fmnist", layers=[1, 1, 1]), tmp_path / "bit.safetensors")
    assert cli_main(["experiment", "families", "--models", str(cnn), "--images", "digits", "--num-images", "1",
                     "--out", str(tmp_path / "o")]) == 2
    assert "has no attention layers to measure" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_run_as_a_script_the_experiment_is_named_by_its_module():
    """`python -m vitlab.experiments.mpp --help` said `usage: python -m vitlab.experiments.__main__`."""
    root = Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, "-m", "vitlab.experiments.posemb", "--steps", "0"], capture_output=True,
                         text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(root)})
    assert res.returncode == 2 and res.stderr == ("python -m vitlab.experiments.posemb: error: --steps must be at "
                                                  "least 1, got 0\n"), res.stderr
