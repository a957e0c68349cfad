"""LoRA / DoRA through peft: the adapted model equals its merge, a LoRA run changes only the adapters (and the head),
the adapter file finds its base and refuses another one, every command takes adapter files, and a killed LoRA run
resumes bit for bit."""

import copy
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

import vitlab
from tests.conftest import CLASS_TOKEN_VIT, randomize_
from tests.hub_fixtures import lay_out_hub_cache, offline_hub_cache
from tests.train_runs import child_env, kill_at_checkpoint, same_tensors, train_and_kill
from vitlab.checkpoints.adapter import checkpoint_sha256
from vitlab.cli import main as cli_main
from vitlab.data import load_arrays
from vitlab.errors import VitlabError
from vitlab.factory import load_lora, read_checkpoint
from vitlab.models import FeatureExtractor
from vitlab.models.lora import LoraSettings, adapter_names, add_lora, has_lora, merge_lora, target_pattern
from vitlab.serve.engine import load_engine
from vitlab.train import TrainConfig, train

pytest.importorskip("peft")

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(CLASS_TOKEN_VIT, img_size=8, patch_size=2, embed_dim=32, depth=2, num_heads=2, mlp_dim=64)


def tiny_vit(num_classes=10, **changes):
    return randomize_(vitlab.create_model("vit_fmnist", **{**TINY, "num_classes": num_classes, **changes}))


def _randomize_adapters(model, seed=1):
    """Adapters with non-zero B (a fresh adapter is an identity), so that the comparisons mean something."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.2 + (1.0 if "magnitude" in name else 0.0))
    return model


@pytest.mark.parametrize("dora", [False, True])
def test_adapted_model_equals_its_merge_and_the_lora_formula(dora):
    torch.manual_seed(0)
    base = tiny_vit()
    x = torch.randn(3, 1, 8, 8)
    adapted = _randomize_adapters(add_lora(copy.deepcopy(base), LoraSettings(rank=4, alpha=8, dora=dora,
                                                                              targets=("attn", "fc2"))))
    assert type(adapted) is type(base) and has_lora(adapted)
    assert len(adapter_names(adapted)) == 2 * 3 * (3 if dora else 2)  # 2 blocks x 3 layers x (A, B[, magnitude])
    # nothing but the adapters trains; the patch embedding's conv (also named proj) is not adapted
    assert {n for n, p in adapted.named_parameters() if p.requires_grad} == set(adapter_names(adapted))
    assert "patch_embed.proj.base_layer.weight" not in dict(adapted.named_parameters())
    with torch.no_grad():
        y = adapted(x)
        merged = merge_lora(copy.deepcopy(adapted))
        assert not has_lora(merged) and set(merged.state_dict()) == set(base.state_dict())
        torch.testing.assert_close(merged(x), y, atol=1e-5, rtol=1e-5)
    if not dora:  # LoRA's merged weight is W + (alpha / r) B A
        a = adapted.blocks[1].attn.qkv.lora_A["default"].weight
        b = adapted.blocks[1].attn.qkv.lora_B["default"].weight
        torch.testing.assert_close(merged.blocks[1].attn.qkv.weight, base.blocks[1].attn.qkv.weight + 2.0 * b @ a)
    else:  # DoRA: each output row of W + s B A rescaled to its learned magnitude
        layer = adapted.blocks[0].attn.proj
        w = base.blocks[0].attn.proj.weight + 2.0 * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        m = layer.lora_magnitude_vector["default"].weight
        torch.testing.assert_close(merged.blocks[0].attn.proj.weight, m[:, None] * w / w.norm(dim=1, keepdim=True))


def test_target_names_and_bad_targets():
    assert target_pattern(["qkv", "mlp"]) == r"blocks\.\d+\.(attn\.qkv|mlp\.fc1|mlp\.fc2)"
    with pytest.raises(vitlab.errors.InvalidValueError, match="unknown layer 'query'"):
        LoraSettings(rank=2, targets=("query",))
    with pytest.raises(vitlab.errors.InvalidValueError, match="lora_rank"):
        LoraSettings(rank=0)


def test_inspection_and_backbone_features_work_on_the_adapted_model():
    torch.manual_seed(0)
    adapted = _randomize_adapters(add_lora(tiny_vit(), LoraSettings(rank=2)))
    merged = merge_lora(copy.deepcopy(adapted))
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        (ya, attn_a), (ym, attn_m) = adapted.forward_with_attention(x), merged.forward_with_attention(x)
        torch.testing.assert_close(ya, ym, atol=1e-5, rtol=1e-5)
        for a, m in zip(attn_a, attn_m):
            torch.testing.assert_close(a, m, atol=1e-5, rtol=1e-5)
        for a, m in zip(adapted.forward_intermediates(x, indices=2)[1], merged.forward_intermediates(x, indices=2)[1]):
            torch.testing.assert_close(a, m, atol=1e-5, rtol=1e-5)
        fa = FeatureExtractor(adapted, indices=(0, 1))(x)
        fm = FeatureExtractor(merged, indices=(0, 1))(x)
        for a, m in zip(fa, fm):
            torch.testing.assert_close(a, m, atol=1e-5, rtol=1e-5)


def _lora_config(tmp_path, source, **changes):
    base = dict(data="digits", init_from=str(source), img_size=8, epochs=None, steps=6, batch_size=64, lr=1e-2,
                weight_decay=0.1, optimizer="adamw", augment="none", out_dir=str(tmp_path / "runs"), threads=1,
                progress=False, eval_every_epochs=0, lora_rank=4, reset_head="always")
    base.update(changes)
    return TrainConfig().replace(**base)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A 6-step LoRA run from a saved tiny model, with a new head and the merged model saved too (shared by the
    tests of this module; a test that changes the base puts it back)."""
    tmp_path = tmp_path_factory.mktemp("lora")
    source = tiny_vit()
    path = vitlab.save(source, tmp_path / "base.safetensors")
    result = train(_lora_config(tmp_path, path, merge_lora=True, run_name="lora"))
    return source, path, result


def test_a_lora_run_changes_only_adapters_and_head_and_saves_a_small_adapter(lora_run, tmp_path):
    source, base_path, result = lora_run
    loaded = dict(source.named_parameters())
    changed = []
    for name, param in result.model.named_parameters():
        plain = name.replace(".base_layer.", ".")
        if plain in loaded:
            if not torch.equal(param.detach(), loaded[plain].detach()):
                changed.append(plain)
    assert changed == ["head.weight", "head.bias"]  # the new zero head trained; every base weight is bit-identical
    state = torch.load(result.run_dir / "checkpoints" / "last.pt", weights_only=True)
    trained = {n for n, p in result.model.named_parameters() if p.requires_grad}
    assert set(state["optimizer"]["state"]) == trained
    # the training state holds what trains; the frozen base is re-read from init_from, its sha256 checked
    assert set(state["model"]) == trained and state["lora_base"]["sha256"] == checkpoint_sha256(base_path)
    adapter = result.run_dir / "adapter.safetensors"
    assert result.model_path == result.run_dir / "model.safetensors"  # merged on request
    assert adapter.stat().st_size < base_path.stat().st_size / 3
    ckpt = read_checkpoint(adapter)
    assert ckpt.container == "lora-adapter" and ckpt.facts["adapter"]["base"]["sha256"]
    # the file reader below the hub finds a base that is a local file by itself
    local = vitlab.checkpoints.read_checkpoint(adapter)
    assert all(torch.equal(local.state_dict[k], v) for k, v in ckpt.state_dict.items())
    from_adapter, merged = vitlab.load(adapter), vitlab.load(result.model_path)
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(from_adapter(x), merged(x))
        torch.testing.assert_close(from_adapter(x), result.model.eval()(x), atol=1e-5, rtol=1e-5)
    assert from_adapter.class_names == merged.class_names == [str(i) for i in range(10)]
    unmerged = load_lora(adapter)
    assert has_lora(unmerged)
    with torch.no_grad():
        torch.testing.assert_close(unmerged(x), from_adapter(x), atol=1e-5, rtol=1e-5)
    log = (result.run_dir / "log.txt").read_text()
    assert "LoRA rank 4 (alpha 4, dropout 0) on qkv,proj of every block; also training head" in log


def test_an_adapter_refuses_a_base_with_another_hash_naming_both(lora_run, tmp_path):
    source, base_path, result = lora_run
    adapter = result.run_dir / "adapter.safetensors"
    with safe_open(str(adapter), "pt") as f:
        want = json.loads(f.metadata()["vitlab_adapter"])["base"]["sha256"]
    other = tiny_vit()
    with torch.no_grad():
        other.blocks[0].attn.qkv.weight[0, 0] += 1.0
    other_path = vitlab.save(other, tmp_path / "other.safetensors")
    with pytest.raises(VitlabError) as info:
        load_lora(adapter, base=other_path)
    message = str(info.value)
    assert "\n" not in message and want in message and str(other_path) in message
    assert checkpoint_sha256(other_path) in message
    kept = tmp_path / "kept.safetensors"
    base_path.rename(kept)
    try:
        with pytest.raises(VitlabError, match="cannot find the adapter's base checkpoint"):
            vitlab.load(adapter)
        other_path.rename(base_path)  # another file under the recorded name
        with pytest.raises(VitlabError, match=re.escape(f"sha256 {want}), but {base_path} has sha256")):
            vitlab.load(adapter)
    finally:
        kept.replace(base_path)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():  # the right base, given where it is
        torch.testing.assert_close(load_lora(adapter, base=base_path, merge=True)(x),
                                   vitlab.load(result.model_path)(x))


def test_commands_take_adapter_files(lora_run, tmp_path, capsys):
    _, _, result = lora_run
    adapter = result.run_dir / "adapter.safetensors"
    out = tmp_path / "merged.safetensors"
    assert cli_main(["convert", "--merge-lora", str(adapter), str(out)]) == 0
    assert "LoRA adapter (rank 4, alpha 4, on qkv,proj) merged into its base" in capsys.readouterr().out
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(vitlab.load(out)(x), vitlab.load(result.model_path)(x))
    assert cli_main(["eval", str(adapter), "--data", "digits", "--img-size", "8", "--json"]) == 0
    from_adapter = json.loads(capsys.readouterr().out)
    assert cli_main(["eval", str(result.model_path), "--data", "digits", "--img-size", "8", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["top1"] == from_adapter["top1"]
    assert cli_main(["info", str(adapter)]) == 0
    assert "adapter" in capsys.readouterr().out.lower()
    # predict: the same top-k lines from the adapter and from the merged model
    test = load_arrays("digits", "test")
    image = tmp_path / "digit.png"
    Image.fromarray(test.images[0, 0].numpy()).save(image)
    assert cli_main(["predict", str(adapter), str(image), "--json"]) == 0
    from_adapter = capsys.readouterr().out
    assert cli_main(["predict", str(result.model_path), str(image), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["top"][0]["class"] == json.loads(from_adapter)["top"][0]["class"]


@pytest.mark.slow
def test_serve_and_onnx_export_take_adapter_files(lora_run, tmp_path):
    _, _, result = lora_run
    adapter = result.run_dir / "adapter.safetensors"
    engine = load_engine(adapter)
    assert engine.class_names == [str(i) for i in range(10)]
    assert cli_main(["export-onnx", str(adapter), str(tmp_path / "m.onnx")]) == 0  # with its parity check
    assert (tmp_path / "m.onnx").is_file()


def test_cli_flags_reach_the_config_and_clashes_are_refused(tmp_path, capsys):
    assert cli_main(["finetune", "--from", "x.safetensors", "--lora-rank", "8", "--lora-alpha", "16", "--lora-dropout",
                     "0.1", "--lora-targets", "attn,mlp", "--lora-train", "head,norm", "--dora", "--merge-lora",
                     "--dry-run"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert (cfg["lora_rank"], cfg["lora_alpha"], cfg["lora_dropout"], cfg["dora"], cfg["merge_lora"]) == \
        (8, 16.0, 0.1, True, True)
    assert cfg["lora_targets"] == ["attn", "mlp"] and cfg["lora_train"] == ["head", "norm"]
    assert TrainConfig.from_dict(cfg).lora_train == ["head", "norm"]
    assert cli_main(["finetune", "--from", "x", "--lora-rank", "4", "--lora-targets", "query", "--dry-run"]) != 0
    assert "--lora-targets query: takes layer names among qkv, proj, fc1, fc2, attn, mlp" in capsys.readouterr().err
    source = vitlab.save(tiny_vit(), tmp_path / "base.safetensors")
    for changes, message in (({"freeze_blocks": 1}, "lora_rank with freeze_blocks"),
                             ({"init_from": None}, "give init_from")):
        with pytest.raises(VitlabError, match=message):
            train(_lora_config(tmp_path, source, **changes))
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_resuming_a_lora_run_whose_base_changed_is_refused_naming_both(tmp_path):
    path = vitlab.save(tiny_vit(), tmp_path / "base.safetensors")
    train(_lora_config(tmp_path, path, steps=1, run_name="short"))
    want = checkpoint_sha256(path)
    vitlab.save(randomize_(tiny_vit(), std=0.06), path)  # another base under the same name
    with pytest.raises(VitlabError, match=f"last.pt: the LoRA run was trained on {re.escape(str(path))} "
                                          f"\\(sha256 {want}\\), but .* now has sha256"):
        train(TrainConfig(threads=1), resume=tmp_path / "runs" / "short", steps=2)


def test_lora_train_chooses_what_else_trains(tmp_path):
    source = tiny_vit()
    path = vitlab.save(source, tmp_path / "base.safetensors")
    # the head is kept (same classes, not zero): by default only the adapters train; norm adds every LayerNorm
    result = train(_lora_config(tmp_path, path, reset_head="never", lora_train=["norm", "pos_embed"], steps=2,
                                lora_targets=["mlp"], run_name="norms"))
    trained = {n for n, p in result.model.named_parameters() if p.requires_grad}
    norms = {n for n in trained if "norm" in n}
    assert norms == {f"blocks.{i}.norm{j}.{w}" for i in (0, 1) for j in (1, 2) for w in ("weight", "bias")} | \
        {"norm.weight", "norm.bias"}
    assert trained - norms - {"pos_embed"} == {n for n in trained if "lora_" in n}
    assert all(".mlp." in n for n in trained if "lora_" in n)
    adapter = read_checkpoint(result.run_dir / "adapter.safetensors")
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():  # norms and position embedding travel in the adapter file
        torch.testing.assert_close(vitlab.load(adapter.path)(x), result.model.eval()(x), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_sigkill_then_resume_of_a_lora_run_is_bit_exact(tmp_path):
    """DoRA with adapter dropout, gradient accumulation, EMA and the head: killed mid-run with SIGKILL, resumed, it
    ends with the adapter of an uninterrupted run, bit for bit."""
    source = vitlab.save(tiny_vit(), tmp_path / "base.safetensors")
    cfg = _lora_config(tmp_path, source, steps=60, batch_size=32, accum_steps=2, ema_decay=0.9, dora=True,
                       lora_dropout=0.1, deterministic=True, save_every_steps=7, lora_targets=["attn", "mlp"],
                       merge_lora=True)
    config_file = tmp_path / "config.json"
    config_file.write_text(cfg.replace(run_name="killed").to_json())
    killed_at = train_and_kill(config_file, tmp_path / "runs" / "killed", lambda step: 14 <= step <= 45,
                               timeout=180, poll=0.02)
    assert killed_at is not None, "the run ended before it could be killed"
    resumed = train(TrainConfig(threads=1), resume=tmp_path / "runs" / "killed")
    reference = train(cfg.replace(run_name="reference"))
    assert resumed.steps == reference.steps == 60
    for name in ("adapter.safetensors", "model.safetensors"):
        assert same_tensors(resumed.run_dir / name, reference.run_dir / name) == []
    a = torch.load(resumed.run_dir / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(reference.run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(a["model_ema"][k], b["model_ema"][k]) for k in a["model_ema"])
    assert resumed.metrics == reference.metrics


def _torchrun(*args: str, background: bool = False) -> subprocess.CompletedProcess | subprocess.Popen:
    """``vitlab train ARGS`` in two processes under torchrun (``background``: started in its own process group, not
    waited for)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "vitlab",
           "train", *args]
    if background:
        return subprocess.Popen(cmd, env=child_env(), start_new_session=True, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    return subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=300)


def _assert_close_files(a: Path, b: Path) -> None:
    sa, sb = load_file(a), load_file(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], atol=1e-5, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_torchrun_two_processes_with_lora_equal_one(tmp_path, fsdp):
    """Two processes (DDP, or FSDP2 with frozen base weights and trainable adapters, norms and head sharded in the
    same units) write the adapter and the merged model of one process."""
    source = vitlab.save(tiny_vit(), tmp_path / "base.safetensors")
    # SGD: without Adam's normalisation, summation-order differences stay at rounding level
    cfg = _lora_config(tmp_path, source, steps=8, optimizer="sgd", lr=0.05, accum_steps=2, run_name="dist",
                       lora_train=["head", "norm"], fsdp=fsdp, dora=fsdp, merge_lora=True, eval_every_epochs=1)
    config_file = tmp_path / "config.json"
    config_file.write_text(cfg.to_json())
    done = _torchrun("--config", str(config_file))
    assert done.returncode == 0, done.stderr[-3000:]
    one = train(cfg.replace(run_name="single", fsdp=False))
    dist = tmp_path / "runs" / "dist"
    for name in ("adapter.safetensors", "model.safetensors"):
        _assert_close_files(one.run_dir / name, dist / name)
    adapter = read_checkpoint(dist / "adapter.safetensors")
    assert adapter.facts["adapter"]["base"]["sha256"] == checkpoint_sha256(source)
    result = json.loads((dist / "result.json").read_text())
    assert result["metrics"]["top1"] == pytest.approx(one.metrics["top1"], abs=1e-12)


def _sigkill_tree(pid: int) -> None:
    """SIGKILL a process and its descendants (torchrun starts each worker in a session of its own, so killing
    torchrun's process group leaves the workers running)."""
    children = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children += [int(c) for c in (task / "children").read_text().split()]
        except OSError:  # the task ended meanwhile
            pass
    for child in children:
        _sigkill_tree(child)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.mark.slow
def test_sigkill_then_resume_of_a_two_process_fsdp_lora_run_is_bit_exact(tmp_path):
    """An FSDP2 DoRA run in two processes, killed with SIGKILL (torchrun and both workers), resumed under torchrun,
    ends with the adapter and merged model of an uninterrupted two-process run, bit for bit."""
    source = vitlab.save(tiny_vit(), tmp_path / "base.safetensors")
    cfg = _lora_config(tmp_path, source, steps=40, batch_size=32, accum_steps=2, dora=True, lora_dropout=0.1,
                       deterministic=True, save_every_steps=5, fsdp=True, merge_lora=True, lora_train=["head", "norm"])
    config_file = tmp_path / "config.json"
    config_file.write_text(cfg.replace(run_name="killed").to_json())
    proc = _torchrun("--config", str(config_file), background=True)
    # waits for a state (a checkpoint mid-run); the bound is for a hang. torchrun starts each worker in a session of
    # its own: the whole process tree is killed
    killed_at = kill_at_checkpoint(proc, tmp_path / "runs" / "killed", lambda step: 10 <= step <= 30, timeout=300,
                                   poll=0.02, kill=lambda p: _sigkill_tree(p.pid))
    assert killed_at is not None, "the run ended (or hung) before it could be killed"
    assert not (tmp_path / "runs" / "killed" / "result.json").exists()
    resumed = _torchrun("--resume", str(tmp_path / "runs" / "killed"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout + resumed.stderr
    config_file.write_text(cfg.replace(run_name="reference").to_json())
    reference = _torchrun("--config", str(config_file))
    assert reference.returncode == 0, reference.stderr[-3000:]
    for name in ("adapter.safetensors", "model.safetensors"):
        assert same_tensors(tmp_path / "runs" / "killed" / name, tmp_path / "runs" / "reference" / name) == []
    a = torch.load(tmp_path / "runs" / "killed" / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "runs" / "reference" / "checkpoints" / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 40 and all(torch.equal(a["model"][k], b["model"][k]) for k in b["model"])


@pytest.mark.slow
def test_compiled_lora_run_trains_like_the_eager_one(tmp_path):
    source = vitlab.save(tiny_vit(), tmp_path / "base.safetensors")
    cfg = _lora_config(tmp_path, source, steps=3, optimizer="sgd", lr=0.05, lora_train=["head"])
    eager = train(cfg.replace(run_name="eager"))
    compiled = train(cfg.replace(run_name="compiled", compile=True))
    a, b = load_file(eager.model_path), load_file(compiled.model_path)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=1e-3)


def test_an_adapter_on_a_hub_base_records_the_hub_name_and_finds_it_again(tmp_path, monkeypatch):
    cache = offline_hub_cache(tmp_path, monkeypatch)
    local = vitlab.save(tiny_vit(), tmp_path / "local.safetensors")
    config = {"architecture": "", "num_classes": 10, "pretrained_cfg": {"num_classes": 10}}  # timm's layout
    snapshot = lay_out_hub_cache(cache, "org/tiny-vit",
                                 {"config.json": config, "model.safetensors": local.read_bytes()})
    result = train(_lora_config(tmp_path, "hf-hub:org/tiny-vit", steps=2, run_name="hub"))
    adapter = result.run_dir / "adapter.safetensors"
    base = read_checkpoint(adapter).facts["adapter"]["base"]
    assert base["name"] == "hf-hub:org/tiny-vit" and base["sha256"] == checkpoint_sha256(local)
    assert Path(base["path"]).parent == snapshot.resolve()
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(vitlab.load(adapter)(x), result.model.eval()(x), atol=1e-5, rtol=1e-5)
