"""`vitlab experiment NAME` and `vitlab.experiments.run`: one row per setting, table cells and plot from the runs,
clear errors for bad options."""

import json

import pytest

import vitlab
from vitlab.cli import main as cli_main
from vitlab.errors import VitlabError
from vitlab.experiments import NAMES, compute, options, posemb, run


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
    for name in NAMES:
        args = options(name)
        assert args.data == "fashion-mnist" and 0 < args.steps <= 300, name
    assert options("mpp").pretrain_steps == 600 and options("data_requirements").sizes == [1000, 6000, 60000]


def test_cli_plot_only_without_results_is_a_one_line_error(tmp_path, capsys):
    assert cli_main(["experiment", "pooling", "--plot-only", "--out", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no results yet" in err and "results.json" in err
    with pytest.raises(SystemExit):
        cli_main(["experiment", "fig99"])


@pytest.mark.parametrize("name,folder", [(n, n) for n in NAMES] + [("data_requirements", "data_requirements_1200")])
def test_docs_tables_are_the_tables_of_the_recorded_results(tmp_path, name, folder):
    """docs/experiments.md shows, for each recorded experiment run, the table its results.json renders to."""
    from pathlib import Path

    docs = Path(__file__).resolve().parent.parent / "docs"
    recorded = docs / "experiments" / folder / "results.json"
    (tmp_path / "results.json").write_text(recorded.read_text())
    rows = run(name, out=str(tmp_path), plot_only=True)
    assert rows and all(r["top1"] is not None for r in rows)
    table = "\n".join(line for line in (tmp_path / "results.md").read_text().splitlines() if line.startswith("|"))
    assert len(table.splitlines()) == len([r for r in rows if r["label"] != "MPP pre-training"]) + 2
    assert table in (docs / "experiments.md").read_text()
