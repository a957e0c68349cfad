"""The training loop and its parts: recipes and overrides, schedules against torch's own schedulers, weight decay
groups, EMA, the run folder, the non-finite guard, and a tiny run that must learn."""

import json
import math

import pytest
import torch

import vitlab
from vitlab.cli import main as cli_main
from vitlab.errors import VitlabError
from vitlab.train import TrainConfig, apply_overrides, get_recipe, list_recipes, train
from vitlab.train.optim import EMA, build_scheduler, decay_parameter_names, lr_factor, parameter_groups

# vit_fmnist shrunk, with the paper's class token and learned position embedding
TINY_MODEL = {"patch_size": 2, "embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_dim": 64, "pool": "token",
              "class_token": True, "pos_embed": "learned"}


def tiny_config(tmp_path, **changes) -> TrainConfig:
    """A digits run that takes about a second: 8x8 images, 2x2 patches, width 32, depth 2."""
    base = dict(data="digits", model="vit_fmnist", img_size=8, model_args=dict(TINY_MODEL), epochs=4, batch_size=64,
                lr=3e-3, warmup_steps=5, augment="none", out_dir=str(tmp_path / "runs"), threads=1,
                eval_every_epochs=2, progress=False, log_every_steps=10)
    base.update(changes)
    return TrainConfig().replace(**base)


def test_recipes_are_listed_shown_and_overridden(capsys):
    names = [r.name for r in list_recipes()]
    assert {"pretrain", "imagenet", "finetune", "small-data", "fashion-mnist"} <= set(names)
    assert cli_main(["train", "--list-recipes"]) == 0
    assert "fashion-mnist" in capsys.readouterr().out
    assert cli_main(["train", "--show-recipe", "finetune", "--lr", "0.01", "--set", "model_args.dropout=0.1"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["optimizer"] == "sgd" and shown["momentum"] == 0.9 and shown["weight_decay"] == 0.0
    assert shown["grad_clip"] == 1.0 and shown["lr"] == 0.01 and shown["model_args"] == {"dropout": 0.1}
    imagenet = get_recipe("imagenet").config()
    assert (imagenet.lr, imagenet.weight_decay, imagenet.schedule, imagenet.grad_clip) == (3e-3, 0.3, "cosine", 1.0)
    assert imagenet.model_args == {"dropout": 0.1}
    pre = get_recipe("pretrain").config()
    assert pre.betas == (0.9, 0.999) and pre.schedule == "linear" and pre.warmup_steps == 10_000
    assert pre.batch_size == 4096 and pre.accum_steps > 1


def test_set_parses_types_and_rejects_unknown_keys():
    cfg = apply_overrides(TrainConfig(), ["crop_scale=0.08,1", "randaugment=2,9", "epochs=null", "steps=100",
                                          "compile=true", "model_args.depth=4", "lr=1e-4"])
    assert cfg.crop_scale == (0.08, 1.0) and cfg.randaugment == (2, 9) and cfg.epochs is None and cfg.steps == 100
    assert cfg.compile is True and cfg.model_args == {"depth": 4} and cfg.lr == 1e-4
    with pytest.raises(ValueError, match="^weight_decy: unknown training config key .did you mean weight_decay"):
        apply_overrides(TrainConfig(), ["weight_decy=0.1"])  # the key, as given (the CLI adds its --set)
    with pytest.raises(ValueError, match="^expects key=value, got 'lr'"):
        apply_overrides(TrainConfig(), ["lr"])
    with pytest.raises(ValueError, match="lr = .fast.: takes a number"):
        apply_overrides(TrainConfig(), ["lr=fast"])
    assert TrainConfig.from_dict(json.loads(cfg.to_json())) == cfg


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_schedule_matches_torch_warmup_then_decay(schedule):
    total, warmup, lr = 50, 10, 0.1
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    ours = build_scheduler(opt, total, warmup, schedule)
    got = []
    for _ in range(total):
        got.append(opt.param_groups[0]["lr"])
        opt.step()
        ours.step()
    # oracle: torch's LinearLR warmup then CosineAnnealingLR / LinearLR decay over the remaining steps
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    warm = torch.optim.lr_scheduler.LinearLR(opt2, start_factor=1 / warmup, end_factor=1.0, total_iters=warmup - 1)
    if schedule == "cosine":
        decay = torch.optim.lr_scheduler.CosineAnnealingLR(opt2, T_max=total - warmup - 1, eta_min=0.0)
    else:
        decay = torch.optim.lr_scheduler.LinearLR(opt2, start_factor=1.0, end_factor=0.0,
                                                  total_iters=total - warmup - 1)
    ref_sched = torch.optim.lr_scheduler.SequentialLR(opt2, [warm, decay], milestones=[warmup])
    expected = []
    for _ in range(total):
        expected.append(opt2.param_groups[0]["lr"])
        opt2.step()
        ref_sched.step()
    assert got == pytest.approx(expected, abs=1e-9)
    assert got[warmup - 1] == pytest.approx(lr) and got[-1] == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(0, 100, 0, "constant") == 1.0


def test_weight_decay_reaches_weight_matrices_only():
    model = vitlab.create_model("vit_fmnist", **TINY_MODEL, img_size=8, representation_size=16)
    names = decay_parameter_names(model)
    expected = {n for n, p in model.named_parameters() if n.endswith(".weight") and p.ndim >= 2}
    assert names == expected and "patch_embed.proj.weight" in names and "head.weight" in names
    assert not any(k in n for n in names for k in ("pos_embed", "cls_token", "norm", "bias"))
    groups = parameter_groups(model, 0.1)
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    # AdamW with zero gradients: only the decayed weights shrink, by the factor (1 - lr * wd)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.optim.AdamW(groups, lr=0.5, weight_decay=0.1).step()
    for n, p in model.named_parameters():
        factor = 0.95 if n in names else 1.0
        torch.testing.assert_close(p.detach(), before[n] * factor)


def test_ema_is_the_polyak_average():
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, decay=0.9, warmup=False)
    start = model.weight.detach().clone()
    values = []
    for step in range(3):
        with torch.no_grad():
            model.weight.add_(1.0)
        values.append(model.weight.detach().clone())
        ema.update(model, step)
    expected = start
    for v in values:
        expected = 0.9 * expected + 0.1 * v
    torch.testing.assert_close(ema.module.weight, expected)
    assert EMA(model, 0.9999).current_decay(0) == pytest.approx(1 / 10)


def test_tiny_run_learns_and_writes_a_complete_run_folder(tmp_path):
    result = train(tiny_config(tmp_path, run_name="tiny", epochs=12))
    run = result.run_dir
    assert run == tmp_path / "runs" / "tiny"
    assert result.metrics["top1"] > 0.6 and result.metrics["samples"] == 359  # chance is 0.1
    assert result.best["top1"] >= result.metrics["top1"]
    config = TrainConfig.from_dict(json.loads((run / "config.json").read_text()))
    assert config.model_args == TINY_MODEL and config.epochs == 12
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [r["epoch"] for r in evals] == [2.0, 4.0, 6.0, 8.0, 10.0, 12.0]
    assert all({"loss", "lr", "images_per_s"} <= set(r) for r in rows if r["kind"] == "step")
    assert (run / "metrics.csv").read_text().splitlines()[0].startswith("step,epoch")
    for name in ("last.pt", "best.pt"):
        state = torch.load(run / "checkpoints" / name, map_location="cpu", weights_only=True)
        assert state["format"] == "vitlab-train-state" and {"model", "optimizer", "scheduler", "rng"} <= set(state)
    assert json.loads((run / "result.json").read_text())["metrics"]["top1"] == result.metrics["top1"]
    assert "M MACs per image forward" in (run / "log.txt").read_text()
    # what it computed with: precision and Linear kernels, and what decided them (tests set both by environment)
    kernels = json.loads((run / "kernels.json").read_text())
    assert kernels["precision"] == "fp32" and kernels["precision_asked"] == "auto"
    assert kernels["precision_reason"] == "auto decided by VITLAB_AUTO_PRECISION=fp32"
    assert kernels["linear"] == {"decided_by": "VITLAB_ONEDNN_LINEAR=0",
                                 "shapes": {"32x10": "F.linear", "32x32": "F.linear", "32x64": "F.linear",
                                            "32x96": "F.linear", "64x32": "F.linear"}}
    assert "Linear kernels (float32 CPU): F.linear for 32x10, 32x32, 32x64" in (run / "log.txt").read_text()
    expected_flops = 6 * vitlab.compute.forward_macs(result.model.cfg) * result.steps * 64
    assert result.train_flops == pytest.approx(expected_flops)
    # the final model reads back with its preprocessing and class names and gives the same accuracy
    loaded = vitlab.load(result.model_path)
    assert loaded.class_names == [str(i) for i in range(10)] and loaded.preprocessing.img_size == (8, 8)
    from vitlab.train import evaluate

    assert evaluate(loaded, "digits", device="cpu")["top1"] == pytest.approx(result.metrics["top1"])


def test_non_finite_steps_are_skipped_then_stop_the_run(tmp_path, monkeypatch):
    calls = {"n": 0}
    original = vitlab.VisionTransformer.forward

    def sometimes_nan(self, x):
        calls["n"] += 1
        out = original(self, x)
        return out * float("nan") if self.training and calls["n"] == 3 else out

    monkeypatch.setattr(vitlab.VisionTransformer, "forward", sometimes_nan)
    result = train(tiny_config(tmp_path, run_name="one-nan", epochs=2))
    log = (result.run_dir / "log.txt").read_text()
    assert "step 2: non-finite loss or gradients" in log and math.isfinite(result.metrics["loss"])

    def always_nan(self, x):
        out = original(self, x)
        return out * float("nan") if self.training else out

    monkeypatch.setattr(vitlab.VisionTransformer, "forward", always_nan)
    with pytest.raises(VitlabError, match="training diverged: 5 non-finite steps in a row"):
        train(tiny_config(tmp_path, run_name="all-nan", max_bad_steps=5))


def test_bad_settings_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="does not split into 2 processes x 3"):
        from vitlab.data.loaders import check_batch_split
        check_batch_split(64, 2, 3)
    with pytest.raises(VitlabError, match="unknown data set|not a named data set"):
        train(tiny_config(tmp_path, data="no-such-set"))
    with pytest.raises(KeyError, match="unknown model"):
        train(tiny_config(tmp_path, model="vit_q99"))


def _choice_flags() -> list[tuple[str, str, str, str]]:
    """(sub-command, flag, config field, choice) for every train / finetune flag with a choice list: argparse's
    choices, or the one-of rule of the field the flag sets."""
    import argparse

    from vitlab.cli import build_parser
    from vitlab.cli.train import FLAG_FIELDS
    from vitlab.train.config import RULES

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    found = []
    for command in ("train", "finetune"):
        for action in commands[command]._actions:
            field = action.dest
            if not action.option_strings or (field not in FLAG_FIELDS and field not in RULES):
                continue
            choices = action.choices or (RULES[field].choices if field in RULES else ())
            found += [(command, action.option_strings[0], field, choice) for choice in choices]
    return found


CHOICE_FLAGS = _choice_flags()


def test_every_choice_flag_is_found():
    flags = {flag for _, flag, _, _ in CHOICE_FLAGS}
    assert {"--augment", "--on-bad-image", "--precision", "--reset-head"} <= flags
    assert ("train", "--augment", "augment", "none") in CHOICE_FLAGS


@pytest.mark.parametrize("command, flag, field, choice", CHOICE_FLAGS)
def test_set_takes_every_value_its_flag_takes(command, flag, field, choice, capsys):
    # a choice that is also a JSON word (`--set augment=none`) is that choice, as with `--augment none`, not null
    base = [command, "--dry-run"] + (["--from", "model.safetensors"] if command == "finetune" else [])
    configs = []
    for option in ([flag, choice], ["--set", f"{field}={choice}"]):
        assert cli_main(base + option) == 0, capsys.readouterr().err
        configs.append(json.loads(capsys.readouterr().out))
    by_flag, by_set = configs
    # the word as the config keeps it (a list field's word is its meaning: trackers "none" is [])
    assert by_flag[field] == by_set[field] == TrainConfig().replace(**{field: choice}).to_dict()[field]
    assert by_flag == by_set


def test_cpu_cost_warns_before_the_papers_fine_tune_and_not_before_the_cpu_preset():
    from vitlab.compute.flops import forward_macs
    from vitlab.models import get_config
    from vitlab.train.loop import CPU_TRAIN_UTILISATION, cpu_cost

    rate = 200e9  # FLOP/s, the oneDNN matrix-product rate measured on the 2-core Xeon
    paper, cpu = get_recipe("finetune").config(), get_recipe("finetune-cpu").config()

    def flops(config, model="vit_ti16", eval_images=10_000):
        macs = forward_macs(get_config(model, img_size=config.img_size, num_classes=10))
        return 6.0 * macs * config.steps * config.batch_size, 2.0 * macs * eval_images

    train_flops, eval_flops = flops(paper)
    warn, line = cpu_cost(train_flops, eval_flops, rate, suggest_preset=True)
    days = (train_flops + eval_flops) / (CPU_TRAIN_UTILISATION * rate) / 86400
    assert warn and f"about {days:.0f} days" in line and "--recipe finetune-cpu" in line, line
    assert f"{train_flops / 1e12:.1f} TFLOPs training" in line
    warn, line = cpu_cost(*flops(cpu), rate)
    assert not warn and "min" in line, line
    # on a slower (busier) CPU the preset's evaluation of 10,000 images dominates: the warning says what to shrink
    warn, line = cpu_cost(*flops(cpu), rate / 8)
    assert warn and "finetune-cpu" not in line and "--set holdout=N" in line, line
    assert cpu.img_size == 160 and cpu.steps * cpu.batch_size == 2400 and cpu.reset_head == "always"


def test_a_cpu_run_logs_its_cost_before_training(tmp_path):
    config = TrainConfig().replace(data="digits", model="vit_fmnist", img_size=8, epochs=None, steps=1,
                                   batch_size=16, augment="none", model_args={"patch_size": 4, "depth": 1},
                                   out_dir=str(tmp_path), threads=1, progress=False, device="cpu")
    result = train(config)
    log = (result.run_dir / "log.txt").read_text()
    assert "cost on this CPU:" in log and "TFLOPs evaluation" in log and "GFLOP/s matrix-product rate" in log


def test_the_deit_recipe_is_deits_table_9():
    """DeiT-B's settings (Touvron et al. 2021, Table 9), as this config spells them."""
    cfg = get_recipe("deit").config()
    assert cfg.model == "deit_b16" and cfg.img_size == 224 and cfg.epochs == 300 and cfg.batch_size == 1024
    assert cfg.optimizer == "adamw" and cfg.lr == pytest.approx(5e-4 * cfg.batch_size / 512)
    assert cfg.lr * cfg.end_lr_factor == pytest.approx(1e-5) and cfg.schedule == "cosine" and cfg.warmup_epochs == 5
    assert cfg.weight_decay == 0.05 and cfg.label_smoothing == 0.1 and cfg.grad_clip == 0.0
    assert cfg.model_args == {"drop_path_rate": 0.1} and vitlab.create_model("deit_b16").cfg.dropout == 0.0
    assert (cfg.randaugment, cfg.mixup, cfg.cutmix, cfg.random_erasing, cfg.aug_repeats) == ((2, 9), 0.8, 1.0, 0.25, 3)
    assert cfg.augment == "crop" and cfg.crop_scale == (0.08, 1.0) and cfg.flip and cfg.ema_decay == 0.0
