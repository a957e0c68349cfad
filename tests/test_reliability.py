"""Issue 17: runs that lose nothing, hostile files refused, bad values refused. One test (or more) per case.

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
