"""The training loop's parts on their own: the frozen run, one step with gradient accumulation, the classification
objective, step logging, and saving / restoring a run's state."""

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

import vitlab
from vitlab.train import distributed as D
from vitlab.train.checkpoint import restore_run_state, save_run_state
from vitlab.train.objectives import Classification
from vitlab.train.progress import StepLog
from vitlab.train.run import Run, build_run
from vitlab.train.runlog import RunLog
from vitlab.train.step import StepOutput, train_step

from .test_train import TINY_MODEL, tiny_config


def _run(tmp_path, name="run", **changes) -> Run:
    cfg = tiny_config(tmp_path, run_name=name, **changes)
    run_dir = tmp_path / name
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    return build_run(cfg, D.setup("cpu"), run_dir, RunLog(run_dir, console=False))


def test_build_run_gives_one_frozen_object_with_the_step_counts(tmp_path):
    run = _run(tmp_path, epochs=3, warmup_steps=100)
    assert run.steps_per_epoch == len(run.train_set) // 64 and run.total_steps == 3 * run.steps_per_epoch
    assert run.warmup_steps == run.total_steps  # capped at the run's length
    assert run.eval_interval == 2 * run.steps_per_epoch  # eval_every_epochs=2
    assert isinstance(run.objective, Classification) and run.ema is None and run.trainable is run.model
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.total_steps = 1


def test_two_accumulated_micro_batches_make_the_step_of_one_full_batch(tmp_path):
    whole = _run(tmp_path, "whole", accum_steps=1)
    halves = _run(tmp_path, "halves", accum_steps=2)
    assert torch.equal(whole.model.pos_embed, halves.model.pos_embed)  # same initial weights
    out_whole = train_step(whole, whole.loader.epoch(0), 0)
    out_halves = train_step(halves, halves.loader.epoch(0), 0)
    assert out_whole.images == out_halves.images == 64 and out_whole.stepped and out_halves.stepped
    torch.testing.assert_close(out_halves.loss, out_whole.loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out_halves.grad_norm, out_whole.grad_norm, rtol=1e-5, atol=1e-6)
    for a, b in zip(whole.model.parameters(), halves.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert whole.scheduler.last_epoch == 1


def test_augmentation_and_patch_dropout_follow_the_sample_not_the_micro_batch(tmp_path):
    """Flips, crops and patch dropout are drawn per sample from its place in the global batch: one batch of 64 and
    two accumulated micro-batches of 32 (as two processes split it) train the same weights (SGD: rounding only)."""
    changes = dict(augment="inception", crop_scale=(0.3, 1.0), patch_dropout=0.5, optimizer="sgd", lr=0.05)
    whole = _run(tmp_path, "whole", accum_steps=1, **changes)
    halves = _run(tmp_path, "halves", accum_steps=2, **changes)
    batches_whole, batches_halves = whole.loader.epoch(0), halves.loader.epoch(0)
    norms = []
    for step in range(3):
        out_whole = train_step(whole, batches_whole, step)
        out_halves = train_step(halves, batches_halves, step)
        torch.testing.assert_close(out_halves.grad_norm, out_whole.grad_norm, rtol=1e-5, atol=1e-6)
        norms.append(out_whole.grad_norm)
    for a, b in zip(whole.model.parameters(), halves.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # the keys are what makes them agree: patch dropout from torch's generator gives another gradient
    unkeyed = _run(tmp_path, "unkeyed", accum_steps=1, **changes)
    batch = next(unkeyed.loader.epoch(0))
    batch.keys = None
    assert not torch.allclose(train_step(unkeyed, iter([batch]), 0).grad_norm, norms[0])


def test_classification_objective_is_label_smoothed_cross_entropy(tmp_path):
    cfg = tiny_config(tmp_path, label_smoothing=0.1)
    objective = Classification(cfg, 10)
    logits, labels = torch.randn(8, 10), torch.randint(0, 10, (8,))
    assert torch.equal(objective.loss(logits, labels), F.cross_entropy(logits, labels, label_smoothing=0.1))
    images = torch.randn(8, 1, 8, 8)
    assert objective.transform(images, labels) == (images, labels)  # no mixup asked for
    mixed, soft = Classification(cfg.replace(mixup=0.5), 10).transform(images, labels)
    assert soft.shape == (8, 10) and torch.allclose(soft.sum(1), torch.ones(8))


def test_step_log_reads_the_loss_back_only_at_logging_steps(tmp_path):
    run = _run(tmp_path, steps=7, epochs=None, log_every_steps=3)
    log = StepLog(run, 0)
    losses = [1.0, 2.0, float("nan"), 4.0, 5.0, 6.0, 7.0]
    for step, loss in enumerate(losses, start=1):
        log.update(step, StepOutput(torch.tensor(loss, dtype=torch.float64), torch.tensor(1.0), True, 0.1, 64))
    run.log.close()
    rows = [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [3, 6, 7]  # every 3 steps and the last
    assert [r["loss"] for r in rows] == [1.5, 5.0, 7.0]  # the non-finite step left out of its window's mean
    assert all(math.isfinite(r["images_per_s"]) for r in rows)


def test_the_time_waiting_for_batches_is_measured_and_logged_as_a_share(tmp_path):
    import time

    run = _run(tmp_path, steps=2, epochs=None, log_every_steps=2)

    def slow(batches):
        for batch in batches:
            time.sleep(0.05)  # a loader slower than the step
            yield batch

    batches = slow(run.loader.epoch(0))
    log = StepLog(run, 0)
    outs = [train_step(run, batches, step) for step in range(2)]
    assert all(0.05 <= out.data_seconds < 5 for out in outs)
    for step, out in enumerate(outs, start=1):
        log.update(step, out)
    run.log.close()
    [row] = [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert 0 < row["data_wait"] <= 1


def test_saved_run_state_restores_model_optimiser_schedule_and_ema(tmp_path):
    run = _run(tmp_path, "saved", ema_decay=0.9)
    batches = run.loader.epoch(0)
    for step in range(3):
        train_step(run, batches, step)
    save_run_state(run, "last.pt", 3, {"top1": 0.5, "step": 3})
    fresh = _run(tmp_path, "fresh", ema_decay=0.9)
    state = torch.load(run.run_dir / "checkpoints" / "last.pt", weights_only=True)
    step, best = restore_run_state(fresh, state, run.run_dir / "checkpoints" / "last.pt")
    assert step == 3 and best == {"top1": 0.5, "step": 3}
    for a, b in zip(run.model.state_dict().values(), fresh.model.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(run.ema.state_dict().values(), fresh.ema.state_dict().values()):
        assert torch.equal(a, b)
    assert fresh.scheduler.last_epoch == 3
    # the next step is the same on both
    out_a, out_b = train_step(run, run.loader.epoch(0, 3), 3), train_step(fresh, fresh.loader.epoch(0, 3), 3)
    assert torch.equal(out_a.loss, out_b.loss)
    assert all(torch.equal(a, b) for a, b in zip(run.model.parameters(), fresh.model.parameters()))


def test_patch_dropout_on_a_hybrid_counts_its_cnn_on_the_whole_image(tmp_path):
    """A hybrid's tokens come from a CNN that sees every pixel; only the tokens after it are dropped. Its training
    cost per image (a cost estimate: the embedding of the dropped tokens is left out) is close to a count of the
    products the training forward runs (torch's FLOP counter, plus the attention products it leaves out here)."""
    from torch.utils.flop_counter import FlopCounterMode

    from vitlab.compute.flops import resnetv2_forward_macs

    backbone = {"layers": [1], "channels": [32], "stem_width": 16, "stem_kernel": 3, "stem_stride": 2,
                "stem_pool": False, "gn_groups": 8, "preact": False, "padding": "same"}
    args = {"patch_size": 1, "embed_dim": 32, "depth": 1, "num_heads": 2, "mlp_dim": 64, "class_token": False,
            "pool": "gap", "pos_embed": "sincos", "backbone": backbone}
    run = _run(tmp_path, model="r_vit_fmnist", model_args=args, patch_dropout=0.5)
    cfg = run.model.cfg
    assert cfg.grid_size == (4, 4)  # 8x8 digits, stride 2, 1x1 patches on the map: 16 tokens, 8 kept
    with FlopCounterMode(display=False) as counter:
        run.trainable.train()(torch.randn(4, 1, 8, 8))
    attention = 2 * 8 * 8 * cfg.embed_dim  # q k^T and attention x v for 8 tokens
    counted = counter.get_total_flops() / 2 / 4 + attention
    assert resnetv2_forward_macs(cfg.backbone, False) < run.train_macs < run.macs
    assert abs(run.train_macs - counted) < 0.1 * counted, (run.train_macs, counted)


def test_the_attention_key_biases_do_not_move_while_the_query_and_value_biases_do(tmp_path):
    """The key bias adds the same amount to every score of a query: softmax ignores it, so its true gradient is zero.
    The step zeroes the rounding noise autograd leaves there (Adam would scale it up to the learning rate); the
    query and value parts of the same fused bias train as usual."""
    run = _run(tmp_path, lr=0.01)
    qkv = run.model.blocks[0].attn.qkv.bias
    dim = qkv.shape[0] // 3
    with torch.no_grad():
        qkv.normal_()  # a checkpoint's key bias is not zero: it must stay what it is, whatever its value
        run.model.head.weight.normal_()  # (zero at initialisation: nothing would reach the blocks at first)
    before = qkv.detach().clone()
    # the gradient autograd computes for it is rounding noise: tiny next to the query part's
    images = torch.randn(8, 1, 8, 8)
    F.cross_entropy(run.model(images), torch.arange(8) % 10).backward()
    assert qkv.grad[dim:2 * dim].abs().max() < 1e-4 * qkv.grad[:dim].abs().max()
    run.model.zero_grad()
    assert len(run.key_biases) == len(run.model.blocks)
    batches = run.loader.epoch(0)
    for step in range(3):
        train_step(run, batches, step)
    assert torch.equal(qkv[dim:2 * dim], before[dim:2 * dim])
    assert not torch.allclose(qkv[:dim], before[:dim]) and not torch.allclose(qkv[2 * dim:], before[2 * dim:])


def test_full_token_epochs_end_a_patch_dropout_run_on_all_tokens(tmp_path):
    """With full_token_epochs the last steps run the model on every token: the same step as a run without patch
    dropout, and the training cost per image is the average of the two phases."""
    plain = _run(tmp_path, "plain", epochs=2, optimizer="sgd", lr=0.05)
    tail = _run(tmp_path, "tail", epochs=2, optimizer="sgd", lr=0.05, patch_dropout=0.5, full_token_epochs=1)
    dropped = _run(tmp_path, "dropped", epochs=2, optimizer="sgd", lr=0.05, patch_dropout=0.5)
    spe = tail.steps_per_epoch
    assert tail.patch_dropout_steps == spe and dropped.patch_dropout_steps == dropped.total_steps
    assert tail.train_macs == (dropped.train_macs + plain.train_macs) // 2
    batch = next(plain.loader.epoch(1))
    out_plain = train_step(plain, iter([batch]), spe)
    out_tail = train_step(tail, iter([batch]), spe)
    out_dropped = train_step(dropped, iter([batch]), spe)
    torch.testing.assert_close(out_tail.grad_norm, out_plain.grad_norm, rtol=1e-6, atol=1e-7)
    for a, b in zip(tail.model.parameters(), plain.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(out_dropped.grad_norm, out_plain.grad_norm, rtol=1e-3)


@pytest.mark.parametrize("patch_dropout", [0.0, 0.5], ids=["all-tokens", "patch-dropout"])
def test_gradient_checkpointing_recomputes_each_block_and_trains_the_same_weights(tmp_path, patch_dropout):
    """``grad_checkpointing``: every block runs its forward again in the backward pass (dropout and drop-path draw
    the same masks again), so three steps end with the weights of a run without it."""
    model_args = {**TINY_MODEL, "dropout": 0.1, "drop_path_rate": 0.1}
    plain = _run(tmp_path, "plain", model_args=model_args, patch_dropout=patch_dropout)
    ckpt = _run(tmp_path, "ckpt", model_args=model_args, patch_dropout=patch_dropout, grad_checkpointing=True)
    assert ckpt.model.grad_checkpointing and not plain.model.grad_checkpointing
    calls = {"plain": 0, "ckpt": 0}
    for name, run in (("plain", plain), ("ckpt", ckpt)):
        run.model.blocks[1].register_forward_pre_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
        batches = run.loader.epoch(0)
        for step in range(3):
            train_step(run, batches, step)
    assert calls == {"plain": 3, "ckpt": 6}
    for (name, a), b in zip(plain.model.named_parameters(), ckpt.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


def test_fine_tuning_a_loaded_checkpoint_trains_in_training_mode(tmp_path):
    """``vitlab.load`` returns models in eval mode; a run fine-tuning one must still train with its dropout on
    (it used to stay in eval mode unless a model_args change made the run rebuild the model)."""
    source = vitlab.create_model("vit_fmnist", img_size=8, num_classes=10, **{**TINY_MODEL, "dropout": 0.5})
    path = vitlab.save(source, tmp_path / "source.safetensors")
    assert not vitlab.load(path).training
    run = _run(tmp_path, init_from=str(path), model_args={})
    assert run.model.training and run.model.cfg.dropout == 0.5
    x = torch.randn(4, 1, 8, 8)
    assert not torch.equal(run.model.forward_features(x), run.model.forward_features(x))  # dropout draws


def test_a_warmup_as_long_as_the_run_is_warned_about(tmp_path):
    run = _run(tmp_path, "short", epochs=None, steps=10, warmup_steps=20)
    assert run.warmup_steps == 10
    log = (tmp_path / "short" / "log.txt").read_text()
    assert "the warmup (20 steps) is as long as the run (10 steps): the learning rate only rises" in log
    _run(tmp_path, "fine", epochs=None, steps=30, warmup_steps=20)
    assert "the warmup" not in (tmp_path / "fine" / "log.txt").read_text()
