"""Bad files: each gives its own clear error, a non-zero exit from `vitlab info` / `vitlab convert`, nothing executed
and nothing written."""

import io
import os
import pickle
import zipfile

import numpy as np
import pytest
import torch

import vitlab
from vitlab.checkpoints import sniff
from vitlab.cli import main
from vitlab.errors import VitlabError

from .checkpoint_fixtures import random_timm_vit, save_npz, vit_jax_arrays

MARKER = "vitlab_payload_ran"


class _Payload:
    """Unpickling this runs ``os.system`` (creates a marker file): what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _bad_files(folder):
    """name -> (path, expected message fragment). Every file is broken in its own way."""
    folder.mkdir()
    good_sd = random_timm_vit(depth=1).state_dict()
    files = {}

    html = folder / "model.npz"
    html.write_text("<!DOCTYPE html>\n<html><head><title>Sign in</title></head><body>login</body></html>\n")
    files["html"] = (html, "HTML")

    lfs = folder / "lfs.safetensors"
    lfs.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:" + "ab" * 32 + "\nsize 346293852\n")
    files["lfs"] = (lfs, "Git-LFS pointer")

    buf = io.BytesIO()
    np.savez(buf, **vit_jax_arrays(random_timm_vit(depth=1)))
    truncated_zip = folder / "truncated.npz"
    truncated_zip.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    files["truncated_zip"] = (truncated_zip, "truncated or corrupt")

    from safetensors.torch import save as st_save

    data = st_save({k: v.contiguous() for k, v in good_sd.items()})
    truncated_st = folder / "truncated.safetensors"
    truncated_st.write_bytes(data[: len(data) - 1000])
    files["truncated_safetensors"] = (truncated_st, "truncated")

    payload = folder / "payload.pth"
    torch.save({"model": good_sd, "extra": _Payload(folder / MARKER)}, payload)
    files["pickle_payload"] = (payload, "refused")

    bare = folder / "bare_pickle.pt"
    bare.write_bytes(pickle.dumps(_Payload(folder / MARKER), protocol=4))
    files["bare_pickle"] = (bare, "refused")

    wrong = dict(good_sd)
    wrong["blocks.0.mlp.fc2.weight"] = torch.zeros(192, 100)
    torch.save(wrong, folder / "wrong_shapes.pth")
    files["wrong_shapes"] = (folder / "wrong_shapes.pth", r"wrong shapes \(1\): blocks.0.mlp.fc2.weight \(192, 100\)")

    nan = dict(good_sd)
    nan["blocks.0.attn.qkv.weight"] = nan["blocks.0.attn.qkv.weight"].clone()
    nan["blocks.0.attn.qkv.weight"][3, 4] = float("nan")
    torch.save(nan, folder / "nan.pth")
    files["nan"] = (folder / "nan.pth", r"non-finite weights \(NaN or Inf\) in 1 tensor\(s\): blocks.0.attn.qkv.weight")

    (folder / "empty.pth").write_bytes(b"")
    files["empty"] = (folder / "empty.pth", "empty")

    (folder / "noise.bin").write_bytes(bytes(range(256)) * 4)
    files["noise"] = (folder / "noise.bin", "not a checkpoint")

    obj = folder / "objects.npz"
    with open(obj, "wb") as f:
        np.savez(f, **{"embedding/kernel": np.array([{"a": 1}], dtype=object)})
    files["object_array"] = (obj, "object array")

    return files


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    return _bad_files(tmp_path_factory.mktemp("bad") / "files")


CASES = ["html", "lfs", "truncated_zip", "truncated_safetensors", "pickle_payload", "bare_pickle", "wrong_shapes",
         "nan", "empty", "noise", "object_array"]


@pytest.mark.parametrize("case", CASES)
def test_bad_file_gives_its_own_clear_error(bad_files, case):
    path, fragment = bad_files[case]
    with pytest.raises(VitlabError, match=fragment) as info:
        vitlab.load(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    assert not (path.parent / MARKER).exists()


@pytest.mark.parametrize("case", CASES)
def test_cli_info_and_convert_exit_non_zero_and_write_nothing(bad_files, case, tmp_path, capsys):
    path, fragment = bad_files[case]
    assert main(["info", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vitlab info: error: ") and err.count("\n") == 1
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    for to, name in [("vitlab", "x.safetensors"), ("npz", "x.npz"), ("hf", "x_hf")]:
        assert main(["convert", str(path), str(out_dir / name), "--to", to]) == 2
        assert "vitlab convert: error: " in capsys.readouterr().err
    assert list(out_dir.iterdir()) == []
    assert not (path.parent / MARKER).exists()


def test_payload_would_run_if_unpickled(bad_files, tmp_path):
    """The payload fixture is real: plain pickle.loads runs it (so the refusals above mean something)."""
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(_Payload(marker)))
    assert marker.exists()


def test_npz_member_with_wrong_declared_size_is_caught(tmp_path):
    path = tmp_path / "lying.npz"
    arrays = vit_jax_arrays(random_timm_vit(depth=1))
    save_npz(path, arrays)
    # rewrite one member with a header that claims more data than the member holds
    fixed = tmp_path / "lying2.npz"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(fixed, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename == "cls.npy":
                data = data.replace(b"(1, 1, 192)", b"(1, 9, 192)")
            dst.writestr(info.filename, data)
    with pytest.raises(VitlabError, match=r"member cls.npy declares shape \(1, 9, 192\)"):
        vitlab.load(fixed)


def test_sniff_recognises_every_good_format(tmp_path):
    sd = random_timm_vit(depth=1).state_dict()
    torch.save(sd, tmp_path / "a.pth")
    save_npz(tmp_path / "a.npz", vit_jax_arrays(random_timm_vit(depth=1)))
    from safetensors.torch import save_file

    save_file(sd, str(tmp_path / "a.safetensors"))
    assert [sniff(tmp_path / n) for n in ("a.pth", "a.npz", "a.safetensors")] == ["torch-zip", "npz", "safetensors"]
    assert sniff(tmp_path) == "directory"


def test_missing_and_unexpected_keys_are_listed_exactly(tmp_path):
    sd = random_timm_vit(depth=2).state_dict()
    del sd["blocks.1.norm2.bias"]
    sd["blocks.1.extra.weight"] = torch.zeros(3)
    torch.save(sd, tmp_path / "odd.pth")
    with pytest.raises(VitlabError, match=r"missing keys \(1\): blocks.1.norm2.bias; unexpected keys \(1\): "
                                          r"blocks.1.extra.weight"):
        vitlab.load(tmp_path / "odd.pth")


def test_cli_info_and_convert_on_good_files(tmp_path, capsys):
    save_npz(tmp_path / "a.npz", vit_jax_arrays(random_timm_vit(depth=1)))
    assert main(["info", str(tmp_path / "a.npz")]) == 0
    out = capsys.readouterr().out
    assert "vit_jax .npz" in out and "depth 1, width 192, heads 3, MLP 384" in out and "GELU tanh" in out
    assert main(["info", str(tmp_path / "a.npz"), "--json"]) == 0
    import json

    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "vit_jax" and info["grid"] == [4, 4] and info["params"] > 0
    assert main(["convert", str(tmp_path / "a.npz"), str(tmp_path / "b.pth"), "--to", "torchvision", "--img-size",
                 "48", "--num-classes", "3"]) == 0
    out = capsys.readouterr().out
    assert "wrote" in out and "new zero-initialised head" in out and "GELU" in out  # tanh -> torchvision's exact
    assert vitlab.load(tmp_path / "b.pth").cfg.img_size == (48, 48)
    assert main(["convert", str(tmp_path / "a.npz"), str(tmp_path / "f.safetensors"), "--to", "vitlab", "--num-classes",
                 "0"]) == 0
    out = capsys.readouterr().out
    assert "0 classes" in out and "head removed (features)" in out and "zero-initialised" not in out


@pytest.mark.parametrize("case", ["vitlab_lying_depth", "vitlab_lying_mlp_dim", "vitlab_lying_width",
                                  "vitlab_lying_classes"])
def test_lying_size_field_is_named_by_vitlab_info_in_one_line(tmp_path, case, capsys):
    from .crafted_checkpoints import CORPUS

    builder, field = CORPUS[case]
    path = builder(tmp_path)
    assert main(["info", str(path)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and field in lines[0] and str(path) in lines[0] and "corrupt" in lines[0], lines


@pytest.mark.slow
def test_checkpoint_lying_about_its_sizes_is_refused_before_anything_is_built(tmp_path):
    """Metadata claiming 10,000,000 blocks (or a width, MLP width or head of billions) next to the weights of one:
    `vitlab info`, `predict` and `convert` answer in one line naming the field, instead of building for minutes.
    One child interpreter with a deadline, so that a regression fails instead of hanging the suite."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from .crafted_checkpoints import CORPUS
    from .serve_helpers import png_bytes

    image = tmp_path / "x.png"
    image.write_bytes(png_bytes())
    cases = {}
    for name in ("vitlab_lying_depth", "vitlab_lying_mlp_dim", "vitlab_lying_width", "vitlab_lying_classes"):
        folder = tmp_path / name
        folder.mkdir()
        cases[name] = (str(CORPUS[name][0](folder)), CORPUS[name][1])
    code = (
        "import contextlib, io, json, sys\n"
        "from vitlab.cli import main\n"
        "out = {}\n"
        "for name, (path, _) in json.loads(sys.argv[1]).items():\n"
        "    for args in (['info', path], ['predict', path, sys.argv[2]],\n"
        "                 ['convert', path, sys.argv[3], '--to', 'vitlab']):\n"
        "        err = io.StringIO()\n"
        "        with contextlib.redirect_stderr(err):\n"
        "            rc = main(args)\n"
        "        out[name + ' ' + args[0]] = [rc, err.getvalue()]\n"
        "print(json.dumps(out))\n")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "out.safetensors"
    done = subprocess.run([sys.executable, "-c", code, json.dumps(cases), str(image), str(out)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    for key, (rc, err) in results.items():
        name = key.split()[0]
        path, field = cases[name]
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and field in lines[0] and path in lines[0], (key, rc, err[-500:])
    assert not out.exists()


@pytest.mark.parametrize("name, content, message", [
    ("config.json", b"\x89PNG\r\n\x1a\n\xff\xfe", "config.json: not a readable JSON file"),
    ("config.json", b"[1, 2]", "config.json: a JSON list, expected an object"),
    ("preprocessor_config.json", b"\xff\xfe\x00", "preprocessor_config.json: not a readable JSON file"),
])
def test_hf_folder_with_a_corrupt_json_file_is_one_line(tmp_path, capsys, name, content, message):
    """A Hugging Face folder whose JSON is not UTF-8 or not an object was a UnicodeDecodeError / AttributeError
    traceback."""
    folder = tmp_path / "hf"
    from vitlab.checkpoints.export import export_hf

    export_hf(vitlab.create_model("vit_ti16", depth=1, img_size=32, num_classes=3), folder)
    (folder / name).write_bytes(content)
    assert main(["info", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
