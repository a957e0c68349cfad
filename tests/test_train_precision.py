"""fp16 training with a gradient scaler (skipped steps logged, the scale in last.pt, exact resume), the precision
``auto`` picks on GPUs with and without bf16, and a training step that never waits for the device: every operation
that would synchronise with a GPU (a read back to the host, a data-dependent shape, a blocking copy in vitlab's own
code) counted during steps that do not log."""

import json
import os
import signal
import sys
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

from vitlab.errors import VitlabError
from vitlab.train import distributed as D
from vitlab.train import run as run_module
from vitlab.train import train
from vitlab.train.checkpoint import restore_run_state, save_run_state
from vitlab.train.config import ConfigValueError
from vitlab.train.run import build_run, resolve_precision
from vitlab.train.runlog import RunLog
from vitlab.train.step import train_step

from .test_train import TINY_MODEL, tiny_config
from .train_runs import same_tensors

VITLAB = str(Path(run_module.__file__).resolve().parents[1])
T = torch.Tensor
# reads of a tensor's value on the host (on a GPU: a wait for every queued kernel) and shapes that depend on values
HOST_READS = {T.item, T.tolist, T.__bool__, T.__float__, T.__int__, T.__index__, T.numpy, T.cpu, T.__repr__,
              T.__format__, T.nonzero, torch.nonzero, T.masked_select, torch.masked_select, T.unique, torch.unique,
              torch.argwhere, T.argwhere}
COPIES = {T.to, T.cuda, T.copy_}  # blocking unless non_blocking=True (counted where vitlab calls them)


class SyncCounter(TorchFunctionMode):
    """Records every call that would synchronise with a CUDA device, with the line that made it."""

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        caller = sys._getframe(1)
        where = f"{getattr(func, '__name__', func)} at {caller.f_code.co_filename}:{caller.f_lineno}"
        if func in HOST_READS:
            self.calls.append(where)
        elif func is T.__getitem__ and _has_mask(args[1]):
            self.calls.append(where)
        elif caller.f_code.co_filename.startswith(VITLAB):
            moves = func in COPIES and (func is not T.to or _names_device(args[1:], kwargs))
            made_on = func in (torch.tensor, torch.as_tensor) and kwargs.get("device") is not None
            if (moves and not kwargs.get("non_blocking")) or made_on:
                self.calls.append(where)
        return func(*args, **kwargs)


def _has_mask(index) -> bool:
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts)


def _names_device(args, kwargs) -> bool:
    return "device" in kwargs or any(isinstance(a, (torch.device, str, torch.Tensor)) for a in args)


def _counted_run(tmp_path, monkeypatch, **changes):
    """A 6-step run that logs only at its last step; returns the synchronising calls of steps 1 to 4 (step 0
    creates the optimiser's state), the loop's code between the steps included."""
    from vitlab.train import loop

    counter, real_step = SyncCounter(), loop.train_step

    def counted_step(run, batches, step):
        if step == 1:
            counter.__enter__()
        if step == 5:
            counter.__exit__(None, None, None)
        return real_step(run, batches, step)

    monkeypatch.setattr(loop, "train_step", counted_step)
    cfg = tiny_config(tmp_path, epochs=None, steps=6, log_every_steps=100, eval_every_epochs=0, save_every_epochs=0,
                      save_every_minutes=0, augment="inception", grad_clip=1.0, ema_decay=0.9, **changes)
    result = train(cfg)
    return counter.calls, result


def test_the_sync_counter_sees_what_would_synchronise(tmp_path):
    x = torch.ones(3)
    with SyncCounter() as counter:
        x.sum().item()
        bool(x.max() > 0)
        x[x > 0]
        torch.where(x > 0, x, 0.0)  # stays on the device: not counted
        x.to("cpu", non_blocking=True)
    assert [c.split(" ")[0] for c in counter.calls] == ["item", "__bool__", "__getitem__"]


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_a_training_step_that_does_not_log_never_waits_for_the_device(tmp_path, monkeypatch, precision, optimizer):
    # fp32 with the fused optimiser that CUDA runs use (the CPU's fp32 keeps the unfused one, read on the host);
    # Muon takes the same found_inf tensor
    monkeypatch.setattr(run_module, "device_side_step", lambda *args: True)
    calls, result = _counted_run(tmp_path, monkeypatch, precision=precision, optimizer=optimizer)
    assert calls == []
    assert result.steps == 6 and torch.isfinite(torch.tensor(result.metrics["loss"]))


def test_the_cpus_unfused_fp32_step_is_the_one_that_reads_back(tmp_path, monkeypatch):
    """The counter sees the host read of the CPU's float32 path (kept for its arithmetic): one skip decision per
    step, and the unfused AdamW's step counts."""
    calls, _ = _counted_run(tmp_path, monkeypatch, precision="fp32")
    assert sum("__bool__ at" in c and c.endswith(f"step.py:{_line_of('elif bool(finite):')}") for c in calls) == 4


def _line_of(text: str) -> int:
    lines = Path(VITLAB, "train", "step.py").read_text().splitlines()
    return next(i for i, line in enumerate(lines, start=1) if text in line)


@pytest.mark.gpu  # benchmarks/gpu_suite.py runs it
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_training_step_that_does_not_log_never_synchronises(tmp_path, monkeypatch):
    from vitlab.train import loop

    real_step = loop.train_step

    def strict_step(run, batches, step):  # from step 1 to step 5: the loop's code between the steps included
        torch.cuda.set_sync_debug_mode("error" if 1 <= step < 5 else "default")
        return real_step(run, batches, step)

    monkeypatch.setattr(loop, "train_step", strict_step)
    try:
        for precision, optimizer in [(p, o) for p in ("fp16", "bf16", "fp32") for o in ("adamw", "muon")]:
            cfg = tiny_config(tmp_path, epochs=None, steps=6, log_every_steps=100, eval_every_epochs=0,
                              device="cuda", save_every_epochs=0, save_every_minutes=0, augment="inception",
                              grad_clip=1.0, ema_decay=0.9, precision=precision, optimizer=optimizer,
                              run_name=f"{precision}-{optimizer}")
            assert train(cfg).steps == 6
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_auto_picks_bf16_fp16_or_fp32_by_what_the_gpu_has(monkeypatch):
    cuda = torch.device("cuda", 0)
    # torch's default answer counts emulated bf16 as supported (it is on a T4)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: has["bf16"]
                        or including_emulation)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: has["capability"])
    has = {"bf16": True, "capability": (9, 0)}
    assert resolve_precision("auto", cuda) == "bf16"  # H100
    has = {"bf16": False, "capability": (7, 5)}
    assert resolve_precision("auto", cuda) == "fp16"  # T4: bf16 only emulated
    has = {"bf16": False, "capability": (6, 0)}
    assert resolve_precision("auto", cuda) == "fp32"  # P100: no fp16 tensor cores
    assert resolve_precision("fp16", cuda) == "fp16" and resolve_precision("auto", torch.device("mps")) == "fp32"
    with pytest.raises(ConfigValueError, match="precision"):
        tiny_config(Path("."), precision="fp8")


def test_fp16_with_fsdp_is_refused_in_one_line(tmp_path):
    cfg = tiny_config(tmp_path, precision="fp16", fsdp=True)
    with pytest.raises(VitlabError, match="precision=fp16 with fsdp is not supported; use precision=bf16"):
        build_run(cfg, D.setup("cpu"), tmp_path, RunLog(tmp_path, console=False))


def _run(tmp_path, name, **changes):
    cfg = tiny_config(tmp_path, run_name=name, precision="fp16", **changes)
    run_dir = tmp_path / name
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    return build_run(cfg, D.setup("cpu"), run_dir, RunLog(run_dir, console=False))


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_an_overflowing_fp16_step_is_skipped_on_the_device_and_the_scale_halved(tmp_path, monkeypatch, optimizer):
    monkeypatch.setattr(run_module, "LOSS_SCALE_INIT", 2.0 ** 60)  # fp16 gradients overflow at this scale
    run = _run(tmp_path, "overflow", optimizer=optimizer)
    assert run.scaler is not None and run.optimizer.defaults["fused"]
    before = [p.detach().clone() for p in run.model.parameters()]
    batches = run.loader.epoch(0)
    out = train_step(run, batches, 0)
    assert not out.stepped and torch.isfinite(out.loss) and run.scaler.get_scale() == 2.0 ** 59
    assert all(torch.equal(a, b) for a, b in zip(before, run.model.parameters()))
    assert all(int(s.get("step", 0)) == 0 for s in run.optimizer.state.values())  # Adam's step count not advanced
    assert all(not s["momentum_buffer"].any() for s in run.optimizer.state.values() if "momentum_buffer" in s)
    run.scaler.update(2.0 ** 10)  # a scale that fits: the next step trains
    out = train_step(run, batches, 1)
    assert out.stepped and not all(torch.equal(a, b) for a, b in zip(before, run.model.parameters()))
    # the scale goes into the training state and comes back
    save_run_state(run, "last.pt", 2, None)
    state = torch.load(run.run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert state["scaler"]["scale"] == 2.0 ** 10 and state["scaler"]["_growth_tracker"] == 1
    saved = run.scaler.state_dict()
    run.scaler.update(5.0)
    restore_run_state(run, state, run.run_dir / "checkpoints" / "last.pt")
    assert run.scaler.state_dict() == saved and run.scaler.get_scale() == 2.0 ** 10


def _step_rows(result) -> list[dict]:
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "step"]


def test_fp16_training_logs_its_skipped_steps_and_follows_the_fp32_losses(tmp_path, monkeypatch):
    common = dict(epochs=None, steps=15, log_every_steps=5, eval_every_epochs=0)
    fp32 = _step_rows(train(tiny_config(tmp_path, precision="fp32", run_name="fp32", **common)))
    fp16 = train(tiny_config(tmp_path, precision="fp16", run_name="fp16", **common))
    rows = _step_rows(fp16)
    assert [r["skipped_steps"] for r in rows] == [0, 0, 0] and rows[-1]["loss_scale"] == 2.0 ** 16
    for a, b in zip(rows, fp32):  # measured: within 0.1% (steps 5, 10, 15 of the tiny model)
        assert b["loss"] == pytest.approx(a["loss"], rel=0.01) and a["loss"] < rows[0]["loss"] * 1.01
    assert json.loads((fp16.run_dir / "result.json").read_text())["precision"] == "fp16"

    monkeypatch.setattr(run_module, "LOSS_SCALE_INIT", 2.0 ** 24)  # the scale too large at first: steps skipped
    rows = _step_rows(result := train(tiny_config(tmp_path, precision="fp16", run_name="high", **common)))
    skipped = sum(r["skipped_steps"] for r in rows)
    assert rows[0]["skipped_steps"] >= 3 and rows[-1]["loss_scale"] == 2.0 ** (24 - skipped)  # halved each time
    log = (result.run_dir / "log.txt").read_text()
    assert "steps 0, 1, 2" in log and "fp16 gradients overflowed the loss scale; skipped, scale now" in log
    assert "non-finite loss" not in log and rows[-1]["loss"] < rows[0]["loss"]


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_fp16_run_stopped_and_resumed_ends_bit_identical(tmp_path, monkeypatch, optimizer):
    """The scale (lowered by overflows before the stop) comes back from last.pt: a resumed run skips no step the
    uninterrupted one did not."""
    from vitlab.train import loop
    from vitlab.train.stop import RunStopped

    monkeypatch.setattr(run_module, "LOSS_SCALE_INIT", 2.0 ** 24)
    cfg = tiny_config(tmp_path, epochs=None, steps=24, eval_every_epochs=0, run_name="job", precision="fp16",
                      log_every_steps=4, model_args={**tiny_config(tmp_path).model_args, "dropout": 0.1},
                      optimizer=optimizer)
    real_step = loop.train_step

    def signalled_step(run, batches, step):
        if step == 12:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(run, batches, step)

    monkeypatch.setattr(loop, "train_step", signalled_step)
    with pytest.raises(RunStopped):
        train(cfg, resume="auto")
    state = torch.load(tmp_path / "runs" / "job" / "checkpoints" / "last.pt", weights_only=True)
    assert state["step"] == 13 and state["scaler"]["scale"] < 2.0 ** 24
    monkeypatch.setattr(loop, "train_step", real_step)
    resumed = train(cfg, resume="auto")
    reference = train(cfg.replace(run_name="reference"))
    assert resumed.steps == 24 and same_tensors(resumed.model_path, reference.model_path) == []


def test_fp16_inference_gives_the_fp32_logits_to_fp16_precision():
    import vitlab
    from vitlab.evaluate.features import model_outputs

    torch.manual_seed(0)
    model = vitlab.create_model("vit_fmnist", img_size=8, num_classes=10, **TINY_MODEL).eval()
    torch.nn.init.normal_(model.head.weight)  # a new head is zero
    data = torch.utils.data.TensorDataset(torch.randn(16, 1, 8, 8), torch.zeros(16, dtype=torch.long))
    fp32 = model_outputs(model, data, device="cpu").outputs
    fp16 = model_outputs(model, data, device="cpu", precision="fp16").outputs
    assert fp16.dtype == torch.float32 and not torch.equal(fp16, fp32)  # really computed in fp16
    torch.testing.assert_close(fp16, fp32, rtol=0, atol=5e-3 * fp32.abs().max().item())
