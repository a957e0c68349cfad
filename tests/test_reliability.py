"""Reliability: runs that lose nothing, hostile files refused, bad values refused. One test (or more) per case.

The crafted-checkpoint corpus (:mod:`tests.crafted_checkpoints`) goes through every command that reads a checkpoint
in a child interpreter (:mod:`tests.corpus_driver`), which measures each run's peak memory above the warmed-up
interpreter; a refusal must cost no more than a small multiple of the file's size.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .crafted_checkpoints import MARKER, build_corpus, empty_file, good_vitlab_file

ROOT = Path(__file__).resolve().parents[1]
MEMORY_SLACK = 24 * 2**20  # bytes a refusal may add to the warm interpreter whatever the file size (allocator noise)
MEMORY_FACTOR = 16  # ... plus this many times the file's size


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "VITLAB_NO_PROGRESS": "1"}


def _ctrl_c_as_in_a_terminal() -> None:
    """A child's SIGINT back to the default, for the Ctrl-C tests: a shell that starts the test run in the background
    (``pytest &``) makes it ignored, and a process inherits that (then Python never raises KeyboardInterrupt)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture
def default_sigint():
    """Python's own Ctrl-C handler in this process for the test (whatever the test run inherited), restored after."""
    import signal

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def _image_folder(root: Path) -> Path:
    from PIL import Image

    for split in ("train", "test"):
        for c, colour in enumerate(["red", "green", "blue"]):
            (root / split / f"class{c}").mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (32, 32), colour).save(root / split / f"class{c}" / f"{i}.png")
    return root


def _commands(work: Path, images: Path) -> dict:
    """command -> argv builder for a checkpoint path: every command that reads a checkpoint."""
    cpu = ["--device", "cpu"]
    return {
        "info": lambda c: ["info", c],
        "predict": lambda c: ["predict", c, str(images / "test" / "class0" / "0.png"), *cpu],
        "eval": lambda c: ["eval", c, "--data", str(images), "--workers", "0", "--batch-size", "4", *cpu],
        "convert": lambda c: ["convert", c, str(work / "converted" / "x.safetensors"), "--to", "vitlab"],
        "finetune --from": lambda c: ["finetune", "--from", c, "--data", str(images), "--steps", "1",
                                      "--batch-size", "4", "--workers", "0", "--out-dir", str(work / "runs"),
                                      "--no-progress", *cpu],
        "inspect": lambda c: ["inspect", c, "--out", str(work / "inspected"), "--images", str(images / "test")],
        "train --resume": lambda c: ["train", "--resume", c, "--no-progress", *cpu],
    }


@pytest.fixture(scope="module")
def corpus_results(tmp_path_factory):
    """Every crafted file through every command, in one child interpreter: {(command, case): result}."""
    work = tmp_path_factory.mktemp("corpus")
    corpus = build_corpus(work / "files")
    images = _image_folder(work / "images")
    good = good_vitlab_file(work)
    empty = empty_file(work)
    commands = _commands(work, images)
    cheap = ("info", "predict", "eval", "convert", "inspect")  # warm up on a good file; the others on a refusal
    warmup = [build(str(good if name in cheap else empty))
              for name, build in _commands(work / "warmup", images).items()]
    cases = {f"{cmd}|{case}": build(str(path)) for cmd, build in commands.items()
             for case, (path, _) in corpus.items()}
    spec, out = work / "spec.json", work / "results.json"
    spec.write_text(json.dumps({"warmup": warmup, "cases": cases}))
    subprocess.run([sys.executable, "-m", "tests.corpus_driver", str(spec), str(out)], cwd=ROOT, env=_env(),
                   check=True, timeout=1200)
    results = json.loads(out.read_text())
    return {tuple(k.split("|")): v for k, v in results.items()}, corpus, work


COMMAND_NAMES = ["info", "predict", "eval", "convert", "finetune --from", "inspect", "train --resume"]


@pytest.mark.parametrize("command", COMMAND_NAMES)
def test_crafted_checkpoints_are_refused_in_one_line_with_bounded_memory(corpus_results, command):
    results, corpus, work = corpus_results
    failures = []
    for case, (path, fragment) in corpus.items():
        r = results[(command, case)]
        lines = r["stderr"].strip().splitlines()
        size = path.stat().st_size
        allowed = MEMORY_FACTOR * size + MEMORY_SLACK
        if r["rc"] != 2 or len(lines) != 1:
            failures.append(f"{case}: rc {r['rc']}, {len(lines)} stderr lines: {r['stderr'][-300:]!r}")
        elif str(path) not in lines[0]:
            failures.append(f"{case}: the message does not name the file: {lines[0]!r}")
        elif command != "train --resume" and fragment.lower() not in lines[0].lower():
            failures.append(f"{case}: expected {fragment!r} in {lines[0]!r}")
        if r["peak_kb"] * 1024 > allowed:
            failures.append(f"{case}: peak memory +{r['peak_kb'] / 1024:.1f} MiB, allowed {allowed / 2**20:.1f} MiB")
        if (path.parent / MARKER).exists():
            failures.append(f"{case}: the pickle payload ran")
    assert not failures, "\n".join(failures)
    converted = work / "converted"
    assert not converted.exists() or not any(converted.iterdir())


def test_corpus_memory_measurement_sees_a_real_allocation(tmp_path):
    """The driver's peak measure is real: a run that does allocate (a conversion to 4096 px, whose resampled
    position embedding and intermediates take some 60 MB) shows up well above the bound the refusals are held to."""
    work = tmp_path
    good = good_vitlab_file(work)
    spec, out = work / "spec.json", work / "out.json"
    spec.write_text(json.dumps({"warmup": [["info", str(good)]],
                                "cases": {"big": ["convert", str(good), str(work / "big.safetensors"), "--to",
                                                  "vitlab", "--img-size", "4096"]}}))
    subprocess.run([sys.executable, "-m", "tests.corpus_driver", str(spec), str(out)], cwd=ROOT, env=_env(),
                   check=True, timeout=600)
    result = json.loads(out.read_text())["big"]
    assert result["rc"] == 0, result["stderr"]
    assert result["peak_kb"] * 1024 > 2 * (MEMORY_FACTOR * good.stat().st_size + MEMORY_SLACK)


# ------------------------------------------------------------------------------------------------ 6, 7 in-process
def test_format_is_decided_from_bytes_not_the_name(tmp_path):
    """A torch.save zip and a legacy torch.save file load whatever they are called (the legacy storages pass the
    declared-size check); a pickle called .safetensors is refused as a pickle, and the payload never runs."""
    import torch

    import vitlab
    from vitlab.errors import VitlabError

    from .crafted_checkpoints import pickle_named_safetensors, tiny_vit

    model = tiny_vit()
    torch.save(model.state_dict(), tmp_path / "zip.safetensors")
    torch.save(model.state_dict(), tmp_path / "legacy.safetensors", _use_new_zipfile_serialization=False)
    x = torch.randn(2, 3, 32, 32)
    for name in ("zip.safetensors", "legacy.safetensors"):
        loaded = vitlab.load(tmp_path / name, model_name=None)
        assert torch.allclose(loaded(x), model(x), atol=1e-5), name
    path = pickle_named_safetensors(tmp_path, payload=True)
    with pytest.raises(VitlabError, match=r"a Python pickle, not a checkpoint: refused") as info:
        vitlab.load(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / MARKER).exists()


# ------------------------------------------------------------------------------------------------ 8, 9: options
def _cli(argv, capsys):
    """Run the CLI in-process: (exit status, stderr lines)."""
    from vitlab.cli import main

    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse
        rc = exc.code
    err = capsys.readouterr().err
    return rc, err.strip().splitlines()


BAD_OPTIONS = [
    (["--epochs", "0"], "--epochs 0: takes a number > 0"),
    (["--steps", "0"], "--steps 0: takes an integer >= 1"),
    (["--set", "model_args.depth=-1"], "--set model_args.depth=-1: takes an integer >= 1"),
    (["--set", "warmup_epochs=-1"], "--set warmup_epochs=-1: takes a number >= 0"),
    (["--workers", "-1"], "--workers -1: takes an integer >= 0"),
    (["--accum-steps", "0"], "--accum-steps 0: takes an integer >= 1"),
    (["--set", "log_every_steps=0"], "--set log_every_steps=0: takes an integer >= 1"),
    (["--label-smoothing", "2"], "--label-smoothing 2: takes a number in [0, 1)"),
    (["--threads", "-1"], "--threads -1: takes an integer >= 1"),
    (["--device", "tpu"], "--device tpu: takes auto, cpu, cuda, cuda:N or mps"),
    (["--set", "model_args.img_size=100000"],
     "--set model_args.img_size=100000: takes an integer in [1, 16384] (or a pair of them)"),
    (["--set", "epochs=true"], "--set epochs=true: takes a number"),
]


@pytest.mark.parametrize(("argv", "message"), BAD_OPTIONS, ids=[" ".join(a) for a, _ in BAD_OPTIONS])
@pytest.mark.parametrize("command", ["train", "finetune"])
def test_numeric_options_out_of_range_are_refused_in_one_line(tmp_path, capsys, command, argv, message):
    extra = ["--from", str(tmp_path / "x.safetensors")] if command == "finetune" else []
    rc, lines = _cli([command, *extra, "--data", "digits", "--out-dir", str(tmp_path / "runs"), *argv], capsys)
    assert rc == 2 and len(lines) == 1, lines
    assert lines[0] == f"vitlab {command}: error: {message}"
    assert not (tmp_path / "runs").exists()  # refused before anything was created


def test_a_saved_config_out_of_range_is_refused_naming_the_file(tmp_path, capsys):
    from .test_train import tiny_config

    data = tiny_config(tmp_path).to_dict()
    data["accum_steps"] = 0
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    rc, lines = _cli(["train", "--config", str(path)], capsys)
    assert rc == 2 and lines == [f"vitlab train: error: {path}: accum_steps = 0: takes an integer >= 1"]


def test_nproc_says_what_it_takes(capsys):
    rc, lines = _cli(["train", "--nproc", "abc"], capsys)
    assert rc == 2
    assert lines[-1] == ("vitlab train: error: argument --nproc: takes a number of processes (an integer >= 1) or "
                         "'auto', got 'abc'")
    assert not any("invalid literal" in line for line in lines)


def test_every_numeric_config_field_has_a_range_rule():
    """Validation lives in one table: a new numeric (or tuple) field without a rule fails here."""
    import typing
    from dataclasses import fields

    from vitlab.train import TrainConfig
    from vitlab.train.config import RULES

    hints = typing.get_type_hints(TrainConfig)
    numeric = [f.name for f in fields(TrainConfig)
               if any(t in (int, float, tuple) or typing.get_origin(t) is tuple
                      for t in (hints[f.name], *typing.get_args(hints[f.name])))
               and hints[f.name] is not bool]
    assert numeric and not [n for n in numeric if n not in RULES]


# ------------------------------------------------------------------------------------------------ 8: files
def _mount_tmpfs(path: Path, options: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder nothing can be written into: a read-only tmpfs where root can mount one (root ignores mode bits),
    else a folder without write permission."""
    path = tmp_path / "read_only"
    if _mount_tmpfs(path, "ro,size=64k"):
        yield path
        subprocess.run(["umount", str(path)], check=True)
    elif os.geteuid() != 0:
        path.chmod(0o555)
        yield path
        path.chmod(0o755)
    else:
        pytest.skip("running as root without permission to mount a read-only tmpfs")


def test_out_dir_that_is_a_file_or_read_only_is_refused_in_one_line(tmp_path, read_only_dir, capsys):
    from .test_train import tiny_config

    config = tmp_path / "config.json"
    config.write_text(tiny_config(tmp_path).to_json())
    a_file = tmp_path / "runs_file"
    a_file.write_bytes(b"precious\n")
    rc, lines = _cli(["train", "--config", str(config), "--out-dir", str(a_file)], capsys)
    assert rc == 2 and lines == [f"vitlab train: error: --out-dir {a_file}: {a_file} is a file, not a folder"]
    assert a_file.read_bytes() == b"precious\n"
    rc, lines = _cli(["train", "--config", str(config), "--out-dir", str(read_only_dir / "runs")], capsys)
    assert rc == 2 and len(lines) == 1 and lines[0].startswith(f"vitlab train: error: --out-dir {read_only_dir}")
    assert "cannot create the run folder" in lines[0]


def test_inspect_and_experiment_out_that_is_a_file_is_refused_in_one_line(tmp_path, capsys):
    """``--out`` naming a file (or a folder under one) was a FileExistsError traceback from ``mkdir``."""
    good = good_vitlab_file(tmp_path)
    a_file = tmp_path / "a_file"
    a_file.write_bytes(b"precious\n")
    for out in (a_file, a_file / "sub"):
        rc, lines = _cli(["inspect", str(good), "--out", str(out), "--what", "filters"], capsys)
        assert rc == 2 and lines == [f"vitlab inspect: error: cannot write {out}: {a_file} is a file, not a folder"]
        rc, lines = _cli(["experiment", "posemb", "--out", str(out), "--steps", "1"], capsys)
        assert rc == 2 and lines == [f"vitlab experiment: error: cannot write {out}: {a_file} is a file, "
                                     "not a folder"]
    assert a_file.read_bytes() == b"precious\n"


def test_eval_and_fewshot_out_under_a_file_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    """They said so only after the whole pass over the data (an hour on ImageNet)."""
    import vitlab.tasks.runs

    monkeypatch.setattr(vitlab.tasks.runs, "load_for_eval", lambda *a, **k: pytest.fail("the work started"))
    good = good_vitlab_file(tmp_path)
    a_file = tmp_path / "a_file"
    a_file.write_bytes(b"precious\n")
    for command in ("eval", "fewshot"):
        for out in (a_file, a_file / "sub"):
            rc, lines = _cli([command, str(good), "--data", "digits", "--out", str(out)], capsys)
            assert rc == 2 and lines == [f"vitlab {command}: error: cannot write {out}: {a_file} is a file, "
                                         "not a folder"]


def test_convert_into_a_read_only_folder_or_under_a_file_is_refused_in_one_line(tmp_path, read_only_dir, capsys):
    good = good_vitlab_file(tmp_path)
    a_file = tmp_path / "a_file"
    a_file.write_bytes(b"precious\n")
    for to, name in [("vitlab", "x.safetensors"), ("npz", "x.npz"), ("hf", "x_hf"), ("torchvision", "x.pth")]:
        rc, lines = _cli(["convert", str(good), str(a_file / name), "--to", to], capsys)
        assert rc == 2 and lines == [f"vitlab convert: error: cannot write {a_file / name}: {a_file} is a file, "
                                     "not a folder"], (to, lines)
        rc, lines = _cli(["convert", str(good), str(read_only_dir / name), "--to", to], capsys)
        assert rc == 2 and len(lines) == 1 and lines[0].startswith(
            f"vitlab convert: error: cannot write {read_only_dir / name}: "), (to, lines)
    assert a_file.read_bytes() == b"precious\n" and list(read_only_dir.iterdir()) == []


@pytest.mark.parametrize("to,name", [("vitlab", "x.safetensors"), ("npz", "x.npz"), ("hf", "x_hf"),
                                     ("torchvision", "x.pth")])
def test_convert_on_a_full_disk_keeps_the_previous_file(tmp_path, capsys, monkeypatch, to, name):
    """The disk fills while the new file is flushed (where a full disk shows at the latest): one line, the previous
    file byte-identical, no temporary left."""
    import errno

    good = good_vitlab_file(tmp_path)
    out = tmp_path / "out"
    assert _cli(["convert", str(good), str(out / name), "--to", to], capsys)[0] == 0
    before = _snapshot(out)

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    rc, lines = _cli(["convert", str(good), str(out / name), "--to", to, "--num-classes", "5"], capsys)
    monkeypatch.undo()
    assert rc == 2 and len(lines) == 1 and "No space left on device" in lines[0], lines
    assert str(out / name) in lines[0]
    assert _snapshot(out) == before


def _snapshot(folder: Path) -> dict:
    """Every file under ``folder`` (hidden temporaries included) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()} | {
        str(p.relative_to(folder)) + "/": b"" for p in sorted(folder.rglob("*")) if p.is_dir()}


def test_convert_onto_a_really_full_disk_keeps_the_previous_file(tmp_path, capsys):
    """The same on a real 96 KiB tmpfs (where it can be mounted): the new file does not fit next to the old."""
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "size=96k"):
        pytest.skip("cannot mount a tmpfs here")
    try:
        good = good_vitlab_file(tmp_path)
        target = disk / "x.safetensors"
        assert _cli(["convert", str(good), str(target), "--to", "vitlab"], capsys)[0] == 0
        before = _snapshot(disk)
        rc, lines = _cli(["convert", str(good), str(target), "--to", "vitlab", "--num-classes", "5"], capsys)
        assert rc == 2 and len(lines) == 1 and str(target) in lines[0], lines
        assert _snapshot(disk) == before
    finally:
        subprocess.run(["umount", str(disk)], check=True)


# ------------------------------------------------------------------------------------- 8: full disk in training
def test_full_disk_at_a_checkpoint_ends_the_run_in_one_line_and_keeps_the_previous_one(tmp_path, capsys,
                                                                                         monkeypatch):
    import errno

    import torch

    from .test_train import tiny_config

    config = tmp_path / "config.json"
    config.write_text(tiny_config(tmp_path, epochs=None, steps=4, save_every_steps=2, eval_every_epochs=0,
                                  run_name="full").to_json())
    last = tmp_path / "runs" / "full" / "checkpoints" / "last.pt"
    real_save, seen = torch.save, {}

    def save(obj, f, *args, **kwargs):
        if "first" not in seen:
            seen["first"] = True
            return real_save(obj, f, *args, **kwargs)
        seen["previous"] = last.read_bytes()
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", save)
    rc, lines = _cli(["train", "--config", str(config)], capsys)
    monkeypatch.undo()
    assert "previous" in seen, "the second checkpoint was never written"
    assert rc == 2 and lines[-1] == (f"vitlab train: error: cannot write {last}: No space left on device; the "
                                     "previous file, if any, is unchanged")
    assert not [line for line in lines if "Traceback" in line]
    assert last.read_bytes() == seen["previous"]
    assert torch.load(last, map_location="cpu", weights_only=True)["step"] == 2
    assert not list(last.parent.glob(".*.tmp"))


# ------------------------------------------------------------------------------------------------ 10: bad images
def _folder_with_a_bad_image(root: Path, bad_name: bytes) -> Path:
    from PIL import Image

    for split in ("train", "test"):
        for c in range(2):
            folder = root / split / f"c{c}"
            folder.mkdir(parents=True)
            for i in range(4):
                Image.new("L", (8, 8), 60 + 120 * c + i).save(folder / f"{i}.png")
    with open(os.path.join(os.fsencode(root / "train" / "c0"), bad_name), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n not really")
    return root


def test_a_bad_image_whose_name_is_not_utf8_is_named_in_the_log(tmp_path, capfd):
    from vitlab.train import train

    from .test_train import tiny_config

    data = _folder_with_a_bad_image(tmp_path / "data", b"bad\xff\xfe.png")
    cfg = tiny_config(tmp_path, data=str(data), epochs=None, steps=2, batch_size=4, eval_every_epochs=0,
                      num_workers=0, run_name="badname")
    result = train(cfg)
    err = capfd.readouterr().err
    assert "--- Logging error ---" not in err and "UnicodeEncodeError" not in err
    log = (result.run_dir / "log.txt").read_text(encoding="utf-8")
    skipped = [line for line in log.splitlines() if "skipped image" in line]
    assert skipped and "bad\\xff\\xfe.png" in skipped[0], log
    assert result.skipped_files >= 1


def test_on_bad_image_fail_with_workers_is_one_line(tmp_path):
    from .test_train import tiny_config

    data = _folder_with_a_bad_image(tmp_path / "data", b"broken.png")
    config = tmp_path / "config.json"
    config.write_text(tiny_config(tmp_path, data=str(data), epochs=None, steps=2, batch_size=4, eval_every_epochs=0,
                                  num_workers=2, on_bad_image="fail").to_json())
    r = subprocess.run([sys.executable, "-m", "vitlab", "train", "--config", str(config)], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=300)
    lines = r.stderr.strip().splitlines()  # the run's log lines, then the error
    assert r.returncode == 2 and lines[-1].startswith("vitlab train: error: "), r.stderr[-2000:]
    assert "broken.png: cannot decode image" in lines[-1]
    assert not [line for line in lines if "Traceback" in line or "DataLoader worker" in line or "File " in line]


# ------------------------------------------------------------------------------------------------ 3: log lines
def test_a_torn_last_metrics_line_is_dropped_and_repaired(tmp_path):
    from vitlab.errors import VitlabError
    from vitlab.train.runlog import RunLog, read_metrics

    path = tmp_path / "metrics.jsonl"
    good = b'{"kind": "step", "step": 10, "loss": 1.5}\n{"kind": "eval", "step": 20, "top1": 0.5}\n'
    for torn in (b'{"kind": "step", "st', b'{"kind": "step", "step": 30}', b'{"kind": "st\n'):
        path.write_bytes(good + torn)
        assert [r["step"] for r in read_metrics(path)] == [10, 20]
        assert path.read_bytes() == good + torn  # reading alone changes nothing
        assert [r["step"] for r in read_metrics(path, repair=True)] == [10, 20]
        assert path.read_bytes() == good
    path.write_bytes(good[:30] + b"\n" + good)  # damage in the middle is not a torn tail: refused, named
    with pytest.raises(VitlabError, match=r"metrics.jsonl: line 1 is not JSON"):
        read_metrics(path)
    # what resume does: drop rows past the checkpoint, tolerating the torn tail
    path.write_bytes(good + b'{"kind": "step", "st')
    log = RunLog(tmp_path, console=False)
    log.truncate_metrics(10)
    log.close()
    assert path.read_bytes() == good.split(b"\n")[0] + b"\n"


def test_log_lines_are_written_whole_or_not_at_all(tmp_path, monkeypatch):
    import errno

    from vitlab.errors import VitlabError
    from vitlab.train.runlog import RunLog

    log = RunLog(tmp_path, console=False)
    log.info("first line")
    log.metric({"kind": "step", "step": 1, "loss": 2.0})
    before = {name: (tmp_path / name).read_bytes() for name in ("log.txt", "metrics.jsonl")}
    real_write = os.write

    def half_then_full(fd, data):  # the disk fills in the middle of the line
        if len(data) > 8:
            return real_write(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(VitlabError, match=r"cannot write .*log.txt: No space left on device"):
        log.info("a line that does not fit on the disk")
    with pytest.raises(VitlabError, match=r"cannot write .*metrics.jsonl: No space left on device"):
        log.metric({"kind": "step", "step": 2, "loss": 1.0})
    monkeypatch.undo()
    log.close()
    assert {name: (tmp_path / name).read_bytes() for name in before} == before


def _run_measured(argv: list[str], cwd: Path) -> tuple[int, str, int]:
    """Run ``python -m vitlab ARGV`` as a child process: (exit status, stderr, its own peak RSS in bytes)."""
    import tempfile

    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen([sys.executable, "-m", "vitlab", *argv], cwd=cwd, env=_env(),
                                stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        return proc.returncode, err.read().decode("utf-8", "replace"), usage.ru_maxrss * 1024


@pytest.mark.slow
@pytest.mark.parametrize("command", ["info", "train --resume"])
def test_crafted_checkpoints_as_separate_processes(tmp_path, command):
    """The corpus as a user meets it: one process per file, exit status 2 and one line on stderr, and the child's
    own peak RSS (wait4) within a small multiple of the file size of the same command's on a tiny file."""
    corpus = build_corpus(tmp_path / "files")
    commands = _commands(tmp_path, _image_folder(tmp_path / "images"))
    baseline_file = good_vitlab_file(tmp_path) if command == "info" else empty_file(tmp_path)
    baseline = _run_measured(commands[command](str(baseline_file)), ROOT)[2]
    failures = []
    for case, (path, _) in corpus.items():
        rc, err, peak = _run_measured(commands[command](str(path)), ROOT)
        lines = err.strip().splitlines()
        if rc != 2 or len(lines) != 1 or str(path) not in lines[0]:
            failures.append(f"{case}: rc {rc}: {err[-300:]!r}")
        allowed = baseline + MEMORY_FACTOR * path.stat().st_size + MEMORY_SLACK
        if peak > allowed:
            failures.append(f"{case}: peak RSS {peak / 2**20:.0f} MiB, baseline {baseline / 2**20:.0f} MiB")
    assert not failures, "\n".join(failures)


def test_export_onnx_weights_refuses_a_pickle_named_safetensors(tmp_path):
    """`vitlab export-onnx MODEL --weights F` decides F's format from its bytes, like every other reader: a pickle
    named .safetensors is refused in one line and its payload never runs."""
    import pickle

    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    weights = tmp_path / "weights.safetensors"
    weights.write_bytes(pickle.dumps(Payload()))
    r = subprocess.run([sys.executable, "-m", "vitlab", "export-onnx", "vit_ti16", str(tmp_path / "m.onnx"),
                        "--weights", str(weights)], cwd=ROOT, env=_env(), capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "pickle" in r.stderr
    assert not marker.exists() and not (tmp_path / "m.onnx").exists()


# ------------------------------------------------------------------------- 1-5, 12: resume and run folders
def _finished_run(root: Path, name: str = "r", **changes) -> Path:
    """A finished tiny digits run (2 epochs of 22 steps, evaluated at the end): its folder."""
    from vitlab.train import train

    from .test_train import tiny_config

    cfg = tiny_config(root, epochs=2, eval_every_epochs=0, run_name=name, **changes)
    return train(cfg).run_dir


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    return _finished_run(tmp_path_factory.mktemp("finished"))


@pytest.fixture
def run_copy(finished_run, tmp_path) -> Path:
    """A private copy of the finished run (a copied run folder is a run folder)."""
    import shutil

    return Path(shutil.copytree(finished_run, tmp_path / "runs" / "copy"))


def _resume(run, capsys, *extra):
    return _cli(["train", "--resume", str(run), "--device", "cpu", "--threads", "1", "--no-progress", *extra], capsys)


def test_resume_writes_only_into_an_identified_run_folder(run_copy, tmp_path, capsys):
    import shutil

    # the reproduction: a checkpoint copied into a backup folder next to a user's own files
    p = tmp_path / "P"
    (p / "backups").mkdir(parents=True)
    (p / "result.json").write_text("precious\n")
    shutil.copy(run_copy / "checkpoints" / "last.pt", p / "backups" / "last.pt")
    # ... a checkpoints/ folder without the config.json vitlab writes, and a checkpoint put into another run's folder
    q = tmp_path / "Q"
    (q / "checkpoints").mkdir(parents=True)
    (q / "metrics.jsonl").write_text('{"kind": "step", "step": 1}\n')
    shutil.copy(run_copy / "checkpoints" / "last.pt", q / "checkpoints" / "last.pt")
    other = _finished_run(tmp_path / "other", "other", seed=3)
    (other / "result.json").unlink()  # unfinished, so only the identification can stop the resume
    shutil.copy(run_copy / "checkpoints" / "last.pt", other / "checkpoints" / "last.pt")
    capsys.readouterr()
    for target, why in [(p / "backups" / "last.pt", "is not in a run folder's checkpoints/ folder"),
                        (q, "config.json is missing"), (q / "checkpoints" / "last.pt", "config.json is missing"),
                        (other, "describes another run than the checkpoint (they differ in out_dir, run_name, seed)")]:
        folder = target if target.is_dir() else target.parent.parent if target.parent.name == "checkpoints" else p
        before = _snapshot(folder)
        rc, lines = _resume(target, capsys)
        assert rc == 2 and len(lines) == 1, lines
        assert "resume writes only into a vitlab run folder" in lines[0] and why in lines[0], lines
        assert _snapshot(folder) == before
    # the real run folder, by its folder or its checkpoint file, is accepted (and, finished, left alone)
    assert _resume(run_copy / "checkpoints" / "last.pt", capsys)[0] == 0


def test_a_finished_run_is_left_alone_unless_made_longer(run_copy, capsys):
    before = _snapshot(run_copy)
    first = json.loads((run_copy / "result.json").read_text())
    rc, lines = _resume(run_copy, capsys)
    assert rc == 0 and len(lines) == 1 and "the run has finished at step 44 (epoch 2.00); nothing changed" in lines[0]
    for extra, flag in [(["--lr", "0.1"], "--lr 0.1"), (["--batch-size", "3"], "--batch-size 3"),
                        (["--set", "model_args.dropout=0.1"], "--set model_args.dropout=0.1"),
                        (["--set", "mixup=0.2"], "--set mixup=0.2"), (["--recipe", "small-data"], "--recipe")]:
        rc, lines = _resume(run_copy, capsys, *extra)
        assert rc == 2 and len(lines) == 1 and lines[0].startswith(f"vitlab train: error: {flag}"), lines
        assert "cannot be changed on --resume" in lines[0]
    rc, lines = _resume(run_copy, capsys, "--epochs", "1")
    assert rc == 2 and len(lines) == 1 and "--epochs 1: the run is already at step 44" in lines[0], lines
    assert _snapshot(run_copy) == before
    # asked to go on: 3 epochs in all; the time counts both segments
    rc, lines = _resume(run_copy, capsys, "--epochs", "3")
    assert rc == 0, lines
    result = json.loads((run_copy / "result.json").read_text())
    assert result["steps"] == 66 and result["epochs"] == 3
    assert result["train_seconds"] > first["train_seconds"] and result["total_seconds"] > first["total_seconds"]
    assert json.loads((run_copy / "config.json").read_text())["epochs"] == 3
    rows = [json.loads(line) for line in (run_copy / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if r["kind"] == "step"]
    assert steps == sorted(set(steps)) and steps[-1] == 66
    assert [r["step"] for r in rows if r["kind"] == "eval"] == [44, 66]


def test_resume_repairs_a_torn_metrics_tail(run_copy, capsys):
    metrics = run_copy / "metrics.jsonl"
    whole = metrics.read_bytes()
    with open(metrics, "ab") as f:
        f.write(b'{"kind": "step", "step": 45, "lo')  # a kill during the append
    rc, lines = _resume(run_copy, capsys, "--steps", "46")
    assert rc == 0, lines
    data = metrics.read_bytes()
    assert data.startswith(whole) and data.endswith(b"\n")
    rows = [json.loads(line) for line in data.decode().splitlines()]  # every line whole
    assert [r["step"] for r in rows if r["kind"] == "step"][-2:] == [44, 46]


def test_a_second_process_on_the_same_run_refuses_naming_the_holder(run_copy, capsys):
    (run_copy / "result.json").unlink()  # an interrupted run: resuming it would write
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from vitlab.train.runfolder import RunLock; RunLock(sys.argv[1]).acquire(); "
        "print('held', flush=True); time.sleep(120)"), str(run_copy)], env=_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = _snapshot(run_copy)
        rc, lines = _resume(run_copy, capsys)
        assert rc == 2 and len(lines) == 1, lines
        assert f"the run is in use by vitlab pid {holder.pid} on " in lines[0] and "started 20" in lines[0]
        assert _snapshot(run_copy) == before
    finally:
        holder.kill()
        holder.wait()
    assert _resume(run_copy, capsys)[0] == 0  # the lock goes with its process
    assert (run_copy / "result.json").is_file()


def test_a_failed_start_leaves_no_run_folder(tmp_path, capsys):
    from PIL import Image

    images = tmp_path / "images"
    (images / "train" / "a").mkdir(parents=True)
    (images / "train" / "b").mkdir(parents=True)  # an empty class folder
    Image.new("RGB", (8, 8), "red").save(images / "train" / "a" / "0.png")
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    out = tmp_path / "runs"
    common = ["--out-dir", str(out), "--device", "cpu", "--no-progress", "--workers", "0"]
    for argv in (["train", "--data", str(images), *common],
                 ["train", "--data", "digits", "--set", "train_subset=100000", *common],
                 ["finetune", "--from", str(tmp_path / "junk.safetensors"), "--data", "digits", *common],
                 ["finetune", "--from", str(tmp_path / "missing.safetensors"), "--data", "digits", *common]):
        rc, lines = _cli(argv, capsys)
        assert rc == 2 and lines and lines[-1].startswith("vitlab "), lines
        assert not out.exists() or list(out.iterdir()) == [], argv


def test_a_failed_final_evaluation_loses_nothing(tmp_path, capsys, monkeypatch):
    """The final checkpoint and model are on disk before the final evaluation; a resume finishes the run."""
    from safetensors.torch import load_file

    from vitlab.train import loop, train

    from .test_train import tiny_config

    def failing(run, on_skipped):
        raise RuntimeError("the evaluation data went away")

    monkeypatch.setattr(loop, "evaluate_run", failing)
    cfg = tiny_config(tmp_path, epochs=2, eval_every_epochs=0, run_name="r", deterministic=True)
    with pytest.raises(RuntimeError, match="went away"):
        train(cfg)
    run = tmp_path / "runs" / "r"
    assert (run / "model.safetensors").is_file() and not (run / "result.json").exists()
    monkeypatch.undo()
    assert _resume(run, capsys)[0] == 0
    reference = _finished_run(tmp_path / "reference", deterministic=True)
    capsys.readouterr()
    a, b = load_file(run / "model.safetensors"), load_file(reference / "model.safetensors")
    assert all(bool((a[k] == b[k]).all()) for k in a)
    assert json.loads((run / "result.json").read_text())["metrics"] == json.loads(
        (reference / "result.json").read_text())["metrics"]


def test_a_kill_in_the_final_writes_is_repaired_on_resume(tmp_path, capsys, monkeypatch):
    """Killed while writing model.safetensors: the temporary next to it goes on resume. Killed between the final
    last.pt and best.pt: the resumed run writes best.pt."""
    import torch

    from vitlab.train import checkpoint, loop, train

    from .test_train import tiny_config

    real = checkpoint.save_run_state

    def killed_at_best(run, name, step, best, times=None):
        if name == "best.pt":
            raise KeyboardInterrupt  # stands for the kill: nothing after this point happens
        real(run, name, step, best, times)

    monkeypatch.setattr(loop, "save_run_state", killed_at_best)
    cfg = tiny_config(tmp_path, epochs=2, eval_every_epochs=0, run_name="r")
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    monkeypatch.undo()
    run = tmp_path / "runs" / "r"
    assert not (run / "checkpoints" / "best.pt").exists() and not (run / "result.json").exists()
    stale = run / ".model.safetensors.x1y2z3.tmp"
    stale.write_bytes(b"half a model")
    assert _resume(run, capsys)[0] == 0
    assert not stale.exists() and not list(run.rglob("*.tmp"))
    best = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    assert best["step"] == 44 and best["best"]["step"] == 44
    assert json.loads((run / "result.json").read_text())["best"]["step"] == 44


@pytest.mark.slow
@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").is_file(),
                    reason="Debian package dataset-fashion-mnist not installed")
def test_the_default_recipe_killed_after_its_first_epoch_resumes_to_the_uninterrupted_result(tmp_path):
    """The main job's recipe (which evaluates only at the end) now keeps last.pt at every epoch end: SIGKILL after
    epoch 1 of 2 and a resume give the weights of a run never interrupted, bit for bit."""
    import signal
    import time

    import torch
    from safetensors.torch import load_file

    def command(name):
        return [sys.executable, "-m", "vitlab", "train", "--recipe", "fashion-mnist", "--epochs", "2", "--set",
                "train_subset=3840", "--set", "holdout=500", "--deterministic", "--threads", "1", "--no-progress",
                "--device", "cpu", "--out-dir", str(tmp_path / "runs"), "--run-name", name]

    proc = subprocess.Popen(command("killed"), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = tmp_path / "runs" / "killed" / "checkpoints" / "last.pt"
    killed_at, deadline = None, time.time() + 900  # waits for a state (last.pt); the bound is only for a hang
    while time.time() < deadline and proc.poll() is None:
        if last.is_file():
            try:
                killed_at = torch.load(last, map_location="cpu", weights_only=True)["step"]
            except Exception:  # caught between writes
                killed_at = None
            if killed_at is not None:
                proc.send_signal(signal.SIGKILL)
                break
        time.sleep(0.02)
    proc.wait()
    from vitlab.train.recipes import get_recipe

    per_epoch = 3840 // get_recipe("fashion-mnist").config().batch_size
    assert killed_at == per_epoch, killed_at  # 3,840 images / the recipe's batch: the first epoch's end
    assert not (tmp_path / "runs" / "killed" / "result.json").exists()
    resumed = subprocess.run([sys.executable, "-m", "vitlab", "train", "--resume", str(tmp_path / "runs" / "killed"),
                              "--threads", "1", "--no-progress", "--device", "cpu"], env=_env(), capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    reference = subprocess.run(command("reference"), env=_env(), capture_output=True, text=True, timeout=600)
    assert reference.returncode == 0, reference.stderr[-2000:]
    a = load_file(tmp_path / "runs" / "killed" / "model.safetensors")
    b = load_file(tmp_path / "runs" / "reference" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = (json.loads((tmp_path / "runs" / n / "result.json").read_text()) for n in ("killed", "reference"))
    assert ra["metrics"] == rb["metrics"] and ra["steps"] == rb["steps"] == 2 * per_epoch


# ------------------------------------------------------------------------------------- 11: Ctrl-C at start-up
def test_ctrl_c_while_workers_are_forked_is_held_back_and_delivered(default_sigint):
    import signal

    from vitlab.data.loaders import _sigint_deferred

    reached = []
    with pytest.raises(KeyboardInterrupt):
        with _sigint_deferred():
            os.kill(os.getpid(), signal.SIGINT)  # the moment a fork's at-fork callbacks could have swallowed it
            reached.append("after the signal")
    assert reached == ["after the signal"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_worker_prints_nothing_when_the_main_process_leaves_mid_handshake():
    """Broken connections in multiprocessing's resource sharer (the main process gone) are silent in a worker; the
    same errors anywhere else, and other errors there, still reach the usual hook."""
    import multiprocessing.resource_sharer as sharer

    from vitlab.data.loaders import _main_process_gone_quietly

    reported = []
    hook = _main_process_gone_quietly(lambda exc_type, exc, tb: reported.append(type(exc).__name__))
    in_sharer, elsewhere = {}, {}
    exec(compile("def serve(exc):\n    raise exc\n", sharer.__file__, "exec"), in_sharer)
    exec(compile("def serve(exc):\n    raise exc\n", "worker_code.py", "exec"), elsewhere)
    for serve, exc in [(in_sharer, EOFError()), (in_sharer, ConnectionResetError(104, "reset")),
                       (in_sharer, BrokenPipeError(32, "broken pipe")), (in_sharer, ValueError("a real bug")),
                       (elsewhere, EOFError())]:
        try:
            serve["serve"](exc)
        except Exception as raised:
            hook(type(raised), raised, raised.__traceback__)
    assert reported == ["ValueError", "EOFError"]


@pytest.mark.slow
def test_ctrl_c_during_start_up_with_workers_ends_the_run_in_one_line(tmp_path):
    """SIGINT at several moments of a --workers 2 run's start-up (the first epoch's worker start, where 1 try in 7
    was swallowed): exit 130, one line, no run folder left (no step was taken)."""
    import signal
    import time

    from PIL import Image

    images = tmp_path / "images"
    for split in ("train", "test"):
        for c in range(3):
            (images / split / f"c{c}").mkdir(parents=True)
            for i in range(16):
                Image.new("RGB", (16, 16), (c * 80, i, 0)).save(images / split / f"c{c}" / f"{i}.png")
    argv = [sys.executable, "-m", "vitlab", "train", "--data", str(images), "--img-size", "16", "--set",
            "model_args.patch_size=4", "--set", "model_args.depth=1", "--set", "model_args.embed_dim=32", "--set",
            "model_args.num_heads=2", "--set", "model_args.mlp_dim=32", "--batch-size", "8", "--epochs", "50",
            "--workers", "2", "--device", "cpu", "--no-progress", "--threads", "1"]
    failures = []
    for n, delay in enumerate([0.0, 0.01, 0.02, 0.03, 0.04, 0.06, 0.08, 0.12]):
        out = tmp_path / f"runs{n}"
        proc = subprocess.Popen([*argv, "--out-dir", str(out)], env=_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, preexec_fn=_ctrl_c_as_in_a_terminal)
        for line in proc.stderr:  # the last line before the loop starts the first epoch's workers
            if line.startswith("training:"):
                break
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        try:
            err = proc.communicate(timeout=60)[1]
        except subprocess.TimeoutExpired:
            proc.kill()
            err = proc.communicate()[1]
            failures.append(f"{delay}: the interrupt was swallowed, the run went on")
            continue
        # what came after the "training:" line, less the CPU-cost line that follows it (printed once the product
        # rate is measured, which on an idle machine can be before the later interrupts arrive)
        lines = [line for line in err.strip().splitlines() if not line.startswith("cost on this CPU:")]
        if proc.returncode != 130 or len(lines) != 1 or not lines[0].endswith("interrupted"):
            failures.append(f"{delay}: exit {proc.returncode}: {err[-400:]!r}")
        left = [p for p in out.iterdir()] if out.exists() else []
        # within the start-up window nothing may stay; later the first step may have run (on an idle machine it
        # does by 0.1 s), and then the folder is a real, resumable run: it must at least say what run it is
        if left and (delay <= 0.04 or not all((p / "config.json").is_file() for p in left)):
            failures.append(f"{delay}: left {[p.name for p in left]}")
    assert not failures, "\n".join(failures)


def test_two_runs_in_one_process_each_log_only_their_own_lines_once(tmp_path):
    """A run's logger and handlers belong to that run: a later run in the same process (which may get a reused
    ``id(...)``) writes its lines once, into its own log.txt, never twice or into an earlier run folder's log."""
    import gc
    import logging

    from vitlab.train import train

    from .test_train import tiny_config

    dirs = []
    for name in ("first", "second"):
        dirs.append(train(tiny_config(tmp_path, epochs=None, steps=2, eval_every_epochs=0, run_name=name)).run_dir)
        gc.collect()  # frees the run's objects now, so that ids are reused as in a long-lived process
    for run_dir, other in zip(dirs, reversed(dirs)):
        lines = (run_dir / "log.txt").read_text().splitlines()
        messages = [line.split(" ", 1)[1] for line in lines]  # without the time stamp
        assert len(messages) == len(set(messages)), f"{run_dir.name}: lines written twice:\n" + "\n".join(lines)
        assert f"run folder: {run_dir}" in messages and any(m.startswith("training: 2 steps") for m in messages)
        assert str(other) not in "\n".join(lines)  # (each run folder is named in its own log only)
    # nothing of either run stays attached in logging's tables
    leaked = [name for name, lg in logging.Logger.manager.loggerDict.items()
              if name.startswith("vitlab.train") and isinstance(lg, logging.Logger) and lg.handlers]
    assert not leaked, leaked


def test_fine_tuning_logs_the_checkpoint_and_its_architecture_as_the_model(finished_run, tmp_path):
    from vitlab.train import train

    from .test_train import tiny_config

    source = finished_run / "model.safetensors"
    result = train(tiny_config(tmp_path, model="vit_b16", epochs=None, steps=1, init_from=str(source),
                               model_args={}, eval_every_epochs=0))
    log = (result.run_dir / "log.txt").read_text()
    assert f"model: {source} (ViT) 8x8, patch 2, 17 tokens, width 32, depth 2" in log
    assert "vit_b16" not in log.split("model: ")[1].splitlines()[0]


def _wait_for_a_training_step(proc: subprocess.Popen, runs: Path, timeout: float = 600) -> None:
    """Wait until the run in ``runs`` has logged a training step (a "step" row in its metrics.jsonl): every process
    is then inside the training loop (rank 0 cannot finish a step before the others join its collectives). A state
    the run reaches, not a time: a busy machine only makes the wait longer. Fails (killing the run) if the run ends
    first or ``timeout`` seconds pass."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        for metrics in runs.glob("*/metrics.jsonl"):
            if any(json.loads(line).get("kind") == "step"
                   for line in metrics.read_text().splitlines() if line.endswith("}")):
                return
        if proc.poll() is not None or time.monotonic() > deadline:
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
            pytest.fail(f"the run {'ended' if proc.returncode is not None else 'took no step in time'} before the "
                        f"interrupt (exit {proc.wait()}): {proc.stderr.read()[-2000:]}")
        time.sleep(0.2)


@pytest.mark.slow
def test_ctrl_c_with_nproc_2_is_one_line_and_exit_130(tmp_path):
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) during a two-process run: torchrun's
    SignalException and the other process's failed collective stay out of sight; one line, exit 130."""
    import signal

    runs = tmp_path / "runs"
    # a step row every 2 steps: the marker that training has started, soon after the start-up lines
    proc = subprocess.Popen([sys.executable, "-m", "vitlab", "train", "--recipe", "fashion-mnist", "--nproc", "2",
                             "--set", "train_subset=2000", "--set", "log_every_steps=2", "--out-dir", str(runs),
                             "--no-progress", "--device", "cpu"],
                            cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=_ctrl_c_as_in_a_terminal)
    _wait_for_a_training_step(proc, runs)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1] == "vitlab train: interrupted", err
    assert not any("Traceback" in line or "SignalException" in line or "death signal" in line for line in lines), err
