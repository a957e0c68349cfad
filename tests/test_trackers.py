"""Experiment trackers (vitlab.train.trackers): TensorBoard, W&B and MLflow, each in its offline mode, read back with
the library's own readers and compared with the run's metrics.jsonl."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from tests.test_train import tiny_config
from vitlab.cli import main as cli_main
from vitlab.errors import VitlabError
from vitlab.train import trackers as T
from vitlab.train import train
from vitlab.train.runlog import read_metrics

pytest.importorskip("tensorboard")
pytest.importorskip("wandb")
pytest.importorskip("mlflow")


def _offline(monkeypatch, folder: Path) -> Path:
    """W&B offline with its folders under ``folder``; MLflow without a tracking URI (the run folder's file store)."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(folder / name.lower()))
    for name in ("WANDB_PROJECT", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_ALLOW_FILE_STORE"):
        monkeypatch.delenv(name, raising=False)
    return folder


@pytest.fixture
def offline(tmp_path, monkeypatch):
    return _offline(monkeypatch, tmp_path)


def _expected(run_dir: Path) -> dict:
    """{(name, step): value} of every number the run logged, as the trackers name them."""
    out = {}
    for row in read_metrics(run_dir / "metrics.jsonl"):
        step, values = T.scalars(row)
        out.update({(k, step): v for k, v in values.items()})
    return out


@pytest.fixture(scope="module")
def all_three(tmp_path_factory):
    """One tiny run (12 steps, logged every 4, evaluated at the end) with all three trackers, read back below."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        folder = _offline(monkeypatch, tmp_path_factory.mktemp("trackers"))
        cfg = tiny_config(folder, epochs=None, steps=12, log_every_steps=4, eval_every_epochs=0,
                          trackers="tensorboard,wandb,mlflow", run_name="trk")
        result = train(cfg)
    return result, _expected(result.run_dir)


def _wandb_records(path: Path):
    """The protobuf records of a W&B ``.wandb`` file: a 7-byte header, then LevelDB-log blocks of 32 KiB whose
    records have a 7-byte header (CRC, length, type: full 1, first 2, middle 3, last 4)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # the block's zero-padded tail
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            pos += left
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def test_tensorboard_event_files_hold_every_metric(all_three):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result, expected = all_three
    acc = EventAccumulator(str(result.run_dir / "tensorboard"))
    acc.Reload()
    got = {(tag, e.step): e.value for tag in acc.Tags()["scalars"] for e in acc.Scalars(tag)}
    assert ("train/loss", 12) in got and ("eval/top1", 12) in got
    assert {k for k, _ in expected} >= {"train/loss", "train/lr", "eval/top1", "eval/loss"}
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-6), key  # event files store float32
    texts = {tag.split("/")[0]: acc.Tensors(tag)[0].tensor_proto.string_val[0].decode()
             for tag in acc.Tags()["tensors"]}
    assert '"run_name": "trk"' in texts["config"] and '"nproc": 1' in texts["system"]
    assert str(result.run_dir / "checkpoints" / "last.pt") in texts["result"]


def test_wandb_offline_run_holds_config_metrics_and_result(all_three):
    result, expected = all_three
    runs = list((result.run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    records = list(_wandb_records(next(runs[0].glob("run-*.wandb"))))
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["run_name"] == "trk" and config["model_args"]["depth"] == 2
    system = config["system"]
    assert system["nproc"] == 1 and system["device"] == "cpu" and system["torch"] and system["cpu"]
    got = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
            got.update({(k, row["_step"]): v for k, v in row.items() if not k.startswith("_")})
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-12), key
    summary = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            summary.update({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in r.summary.update})
    assert summary["checkpoint"] == str(result.run_dir / "checkpoints" / "last.pt")
    assert summary["model_path"] == str(result.model_path)
    assert summary["final.top1"] == pytest.approx(result.metrics["top1"])
    assert any(r.WhichOneof("record_type") == "exit" and r.exit.exit_code == 0 for r in records)


def test_mlflow_file_store_holds_params_metrics_and_result(all_three):
    from mlflow.tracking import MlflowClient

    result, expected = all_three
    ids = json.loads((result.run_dir / "trackers.json").read_text())
    uri = ids["mlflow"]["tracking_uri"]
    assert uri == (result.run_dir / "mlruns").resolve().as_uri()
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(ids["mlflow"]["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "trk"
    assert run.data.params["run_name"] == "trk" and run.data.params["model_args.depth"] == "2"
    assert run.data.tags["system.nproc"] == "1" and run.data.tags["system.device"] == "cpu"
    assert run.data.tags["checkpoint"] == str(result.run_dir / "checkpoints" / "last.pt")
    got = {}
    for name in {k for k, _ in expected}:
        got.update({(name, m.step): m.value for m in client.get_metric_history(run.info.run_id, name)})
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-12), key


def test_resumed_run_continues_the_same_tracker_runs(offline):
    from mlflow.tracking import MlflowClient

    cfg = tiny_config(offline, epochs=None, steps=12, eval_every_epochs=0, trackers=["wandb", "mlflow"],
                      log_every_steps=4, run_name="again")
    first = train(cfg)
    ids = json.loads((first.run_dir / "trackers.json").read_text())
    second = train(cfg.replace(trackers=None), resume=first.run_dir, steps=20)  # not chosen again: kept
    assert second.run_dir == first.run_dir
    assert json.loads((first.run_dir / "trackers.json").read_text()) == ids
    client = MlflowClient(tracking_uri=ids["mlflow"]["tracking_uri"])
    steps = sorted(m.step for m in client.get_metric_history(ids["mlflow"]["run_id"], "train/loss"))
    assert steps == [4, 8, 12, 16, 20]
    # offline-run-<date>_<time>-<id>, and "-1" after it when the resumed run starts within the same second
    folders = [p.name.split("-") for p in (first.run_dir / "wandb").glob("offline-run-*")]
    assert len(folders) == 2 and {parts[3] for parts in folders} == {ids["wandb"]["id"]}


def test_default_is_tensorboard_when_installed_and_none_turns_it_off(tmp_path, monkeypatch):
    assert T.chosen_trackers(None) == ["tensorboard"]
    monkeypatch.setattr(T, "_installed", lambda module: False)
    assert T.chosen_trackers(None) == []
    monkeypatch.undo()
    run = train(tiny_config(tmp_path, epochs=1, eval_every_epochs=0, trackers="none")).run_dir
    assert not (run / "tensorboard").exists() and not (run / "trackers.json").exists()


def test_missing_package_is_one_line_naming_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(T, "_installed", lambda module: module != "wandb")
    with pytest.raises(VitlabError, match=r"^trackers=wandb: the wandb package is not installed; install vitlab's "
                                          r"'wandb' extra \(pip install 'vitlab\[wandb\]'\)$"):
        T.chosen_trackers(["tensorboard", "wandb"])
    out = tmp_path / "runs"
    code = cli_main(["train", "--data", "digits", "--steps", "1", "--out-dir", str(out), "--tracker", "mlflow,wandb",
                     "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and err[0].endswith(
        "--tracker wandb: the wandb package is not installed; install vitlab's 'wandb' extra "
        "(pip install 'vitlab[wandb]')")
    assert not out.exists() or not any(out.iterdir())  # the run folder made for it is gone again


def test_tracker_flag_and_set_choose_trackers(capsys):
    assert cli_main(["train", "--dry-run", "--tracker", "wandb", "--tracker", "mlflow"]) == 0
    assert json.loads(capsys.readouterr().out)["trackers"] == ["wandb", "mlflow"]
    assert cli_main(["train", "--dry-run", "--set", "trackers=none"]) == 0
    assert json.loads(capsys.readouterr().out)["trackers"] == []
    assert cli_main(["train", "--dry-run", "--tracker", "comet"]) != 0
    assert "--tracker comet: takes tracker names among tensorboard, wandb, mlflow" in capsys.readouterr().err


def test_a_tracker_failing_mid_run_is_reported_once_and_the_run_goes_on(tmp_path, monkeypatch):
    calls = []

    class Flaky:
        def __init__(self, run_dir, config, system, ids):
            pass

        def log(self, step, values):
            calls.append(step)
            raise ConnectionError("tracking server gone")

        def finish(self, result):
            calls.append("finish")

        def close(self, ok):
            calls.append("close")

    monkeypatch.setitem(T._KINDS, "tensorboard", Flaky)
    # the default (trackers null) opens TensorBoard, installed here
    result = train(tiny_config(tmp_path, epochs=None, steps=8, log_every_steps=4, eval_every_epochs=0))
    assert calls == [4] and result.steps == 8 and result.model_path.is_file()
    lines = [line for line in (result.run_dir / "log.txt").read_text().splitlines() if "tracker tensorboard" in line]
    assert len(lines) == 1 and lines[0].endswith("warning: tracker tensorboard failed (ConnectionError: tracking "
                                                 "server gone); it logs nothing more in this run (metrics.jsonl "
                                                 "has every row)")


def test_only_the_main_process_opens_trackers_but_every_process_checks_them(tmp_path, monkeypatch):
    from vitlab.train import TrainConfig
    from vitlab.train.distributed import DistInfo
    from vitlab.train.runlog import RunLog

    config = TrainConfig(trackers="tensorboard,mlflow")
    with RunLog(tmp_path, enabled=False, console=False, config=config, info=DistInfo(rank=1, world_size=2)) as log:
        log.metric({"kind": "step", "step": 1, "loss": 1.0})
        log.result({"metrics": {}, "model_path": None})
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(T, "_installed", lambda module: module != "mlflow")
    with pytest.raises(VitlabError, match=r"^trackers=mlflow: the mlflow package is not installed"):
        RunLog(tmp_path, enabled=False, console=False, config=config, info=DistInfo(rank=1, world_size=2))


def test_an_mlflow_store_that_refuses_is_one_line(offline, monkeypatch):
    # MLflow >= 3.7 refuses a file store the user names without MLFLOW_ALLOW_FILE_STORE (vitlab allows only its own)
    import mlflow

    if tuple(int(p) for p in mlflow.__version__.split(".")[:2]) < (3, 7):
        pytest.skip("this MLflow takes file stores without asking")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (offline / "elsewhere").as_uri())
    with pytest.raises(VitlabError, match=r"^trackers=mlflow: cannot start the MLflow run at file://.*elsewhere "
                                          r"\(MlflowException: .*MLFLOW_ALLOW_FILE_STORE.*check MLFLOW_TRACKING_URI"):
        T.Trackers(offline / "run", ["mlflow"], {"lr": 0.1}, {"nproc": 1})
    assert not (offline / "elsewhere").exists()
