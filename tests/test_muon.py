"""The Muon optimiser (vitlab.train.muon): the orthogonalisation against the SVD, the Muon update against
torch.optim.Muon, the AdamW half bit for bit against torch.optim.AdamW, which parameters go where, resuming from a
saved state, and a training run with it."""

import io

import pytest
import torch

import vitlab
from vitlab.errors import VitlabError
from vitlab.train import train
from vitlab.train.muon import NEWTON_SCHULZ, MuonAdamW, muon_parameter_ids, orthogonalize
from vitlab.train.optim import build_optimizer

from .test_train import TINY_MODEL, tiny_config


def _fmnist_model(**changes):
    torch.manual_seed(0)
    return vitlab.create_model("vit_fmnist", **changes)


def _set_grads(model, seed):
    generator = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=generator)


@pytest.mark.parametrize("shape", [(96, 288), (288, 96), (4, 64, 64), (3, 40, 24)])
def test_orthogonalize_keeps_the_singular_vectors_and_pulls_the_values_near_one(shape):
    # the iteration is an odd polynomial in G: U^T f(G) V is diagonal, holding the scalar iteration of each singular
    # value (over the Frobenius norm); values spread over two decades all land in about [0.7, 1.2]
    generator = torch.Generator().manual_seed(1)
    *batch, rows, cols = shape
    k = min(rows, cols)
    u, _ = torch.linalg.qr(torch.randn(*batch, rows, k, generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(*batch, cols, k, generator=generator, dtype=torch.float64))
    s = torch.logspace(0, 2, k, dtype=torch.float64)[torch.randperm(k, generator=generator)]
    g = u @ torch.diag_embed(s.expand(*batch, k)) @ v.mT
    out = orthogonalize(g.float()).double()
    assert out.shape == g.shape
    inner = u.mT @ out @ v
    diagonal = torch.diagonal(inner, dim1=-2, dim2=-1)
    assert (inner - torch.diag_embed(diagonal)).abs().max() < 1e-4
    x = s / s.square().sum().sqrt()
    for _ in range(5):
        x = NEWTON_SCHULZ[0] * x + NEWTON_SCHULZ[1] * x ** 3 + NEWTON_SCHULZ[2] * x ** 5
    torch.testing.assert_close(diagonal, x.expand_as(diagonal), atol=1e-4, rtol=0)
    assert diagonal.min() > 0.65 and diagonal.max() < 1.25
    if batch:  # a batch is each matrix on its own
        for i in range(batch[0]):
            torch.testing.assert_close(orthogonalize(g[i].float()), out[i].float(), atol=1e-5, rtol=0)


def test_muon_update_matches_torch_muon_with_adamw_matched_learning_rates():
    # torch's Muon runs its Newton-Schulz iteration in bfloat16, vitlab's in float32: equal up to bf16 rounding
    lr, wd = 0.02, 0.1
    weight = torch.randn(192, 96, generator=torch.Generator().manual_seed(2))
    ours, theirs = torch.nn.Parameter(weight.clone()), torch.nn.Parameter(weight.clone())
    mine = MuonAdamW([{"params": [ours], "muon": True}], lr=lr, weight_decay=wd, momentum=0.95)
    ref = torch.optim.Muon([theirs], lr=lr, weight_decay=wd, momentum=0.95, nesterov=True,
                           adjust_lr_fn="match_rms_adamw")
    for step in range(3):
        grad = torch.randn(192, 96, generator=torch.Generator().manual_seed(10 + step))
        before = ours.detach().clone()
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        mine.step()
        ref.step()
        ours_delta, ref_delta = ours.detach() - before, theirs.detach() - before
        cosine = torch.nn.functional.cosine_similarity(ours_delta.flatten(), ref_delta.flatten(), dim=0)
        assert cosine > 0.999
        assert ours_delta.norm() / ref_delta.norm() == pytest.approx(1.0, abs=0.02)
    # the first update from zero: -0.2 sqrt(192) lr O, O with 96 singular values near 1, so its RMS is about
    # 0.2 lr whatever the shape (the RMS of a typical AdamW update)
    first = MuonAdamW([{"params": [p := torch.nn.Parameter(torch.zeros(192, 96))], "muon": True}], lr=lr)
    p.grad = torch.randn(192, 96)
    first.step()
    rms = p.detach().square().mean().sqrt().item()
    assert 0.68 * 0.2 * lr < rms < 1.13 * 0.2 * lr


def test_the_adamw_half_is_torch_adamw_bit_for_bit():
    model, reference = _fmnist_model(), _fmnist_model()
    optimizer = build_optimizer(model, "muon", 3e-3, weight_decay=0.05, betas=(0.9, 0.98))
    muon_ids = muon_parameter_ids(model)
    names = {id(p): n for n, p in model.named_parameters()}
    adam_names = [names[id(p)] for g in optimizer.param_groups if not g["muon"] for p in g["params"]]
    ref_params = dict(reference.named_parameters())
    decayed = {n for g in optimizer.param_groups if not g["muon"] and g["weight_decay"] for n in
               (names[id(p)] for p in g["params"])}
    ref_opt = torch.optim.AdamW(
        [{"params": [ref_params[n] for n in adam_names if n in decayed], "weight_decay": 0.05},
         {"params": [ref_params[n] for n in adam_names if n not in decayed], "weight_decay": 0.0}],
        lr=3e-3, betas=(0.9, 0.98), foreach=True)
    for step in range(4):
        _set_grads(model, step)
        _set_grads(reference, step)
        optimizer.step()
        ref_opt.step()
    for n in adam_names:
        assert torch.equal(model.get_parameter(n), reference.get_parameter(n)), n
    moved = [n for n, p in model.named_parameters() if id(p) in muon_ids]
    assert all(not torch.equal(model.get_parameter(n), reference.get_parameter(n)) for n in moved)


def test_muon_takes_the_encoder_matrices_and_adamw_the_rest():
    model = vitlab.create_model("vit_fmnist", representation_size=48)
    ids = muon_parameter_ids(model)
    muon = {n for n, p in model.named_parameters() if id(p) in ids}
    expected = {f"blocks.{i}.{layer}.weight" for i in range(4)
                for layer in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")} | {"pre_logits.fc.weight"}
    assert muon == expected
    # frozen matrices have no place in any group; layer decay's per-group lr scales stay on both halves
    model.blocks[0].attn.qkv.weight.requires_grad_(False)
    optimizer = build_optimizer(model, "muon", 1e-3, weight_decay=0.05, layer_decay=0.5)
    grouped = [p for g in optimizer.param_groups for p in g["params"]]
    assert all(p is not model.blocks[0].attn.qkv.weight for p in grouped)
    assert len(grouped) == sum(p.requires_grad for p in model.parameters())
    for group in optimizer.param_groups:
        assert all(p.ndim == 2 for p in group["params"]) if group["muon"] else True
    block1 = [g for g in optimizer.param_groups if any(p is model.blocks[1].mlp.fc1.weight for p in g["params"])]
    head = [g for g in optimizer.param_groups if any(p is model.head.weight for p in g["params"])]
    assert block1[0]["muon"] and not head[0]["muon"]
    assert block1[0]["lr"] < head[0]["lr"]


def test_a_saved_state_resumes_to_the_same_weights():
    def run(steps, resume_after=None):
        model = _fmnist_model()
        optimizer = build_optimizer(model, "muon", 2e-3, weight_decay=0.05)
        for step in range(steps):
            if step == resume_after:  # through torch.save / weights_only load, as a checkpoint goes
                buffer = io.BytesIO()
                torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
                buffer.seek(0)
                state = torch.load(buffer, weights_only=True)
                model = _fmnist_model()
                model.load_state_dict(state["model"])
                optimizer = build_optimizer(model, "muon", 2e-3, weight_decay=0.05)
                optimizer.load_state_dict(state["optimizer"])
            _set_grads(model, step)
            optimizer.step()
        return model

    straight, resumed = run(6), run(6, resume_after=3)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_run_trains_with_muon_and_refuses_fsdp(tmp_path):
    adamw = train(tiny_config(tmp_path, run_name="adamw", epochs=6, eval_every_epochs=0))
    muon = train(tiny_config(tmp_path, run_name="muon", epochs=6, eval_every_epochs=0, optimizer="muon"))
    assert muon.metrics["top1"] > 0.5  # 10 classes; AdamW reaches about 0.63 here, Muon about 0.67
    assert muon.metrics["top1"] != adamw.metrics["top1"] or muon.metrics["loss"] != adamw.metrics["loss"]
    with pytest.raises(VitlabError, match="optimizer=muon with FSDP is not supported"):
        train(tiny_config(tmp_path, run_name="fsdp", optimizer="muon", fsdp=True,
                          model_args={**TINY_MODEL}))


def test_the_device_side_skip_steps_as_the_host_one_and_a_skipped_step_changes_nothing():
    host_model, device_model = _fmnist_model(), _fmnist_model()
    host = build_optimizer(host_model, "muon", 3e-3, weight_decay=0.1)
    device = build_optimizer(device_model, "muon", 3e-3, weight_decay=0.1, fused=True)
    assert device.defaults["fused"] and not host.defaults["fused"]
    for step in range(3):
        _set_grads(host_model, step)
        _set_grads(device_model, step)
        host.step()
        device.found_inf = torch.zeros(())
        device.step()
        del device.found_inf
    for (name, a), b in zip(host_model.named_parameters(), device_model.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
    # a step whose gradients overflowed: found_inf = 1 leaves every weight and every state tensor as it was
    before = {n: p.detach().clone() for n, p in device_model.named_parameters()}
    state_before = [(k, v.clone()) for s in device.state.values() for k, v in s.items()]
    for p in device_model.parameters():
        p.grad = torch.full_like(p, float("inf"))
    device_model.blocks[0].mlp.fc1.weight.grad[0, 0] = float("nan")
    device.found_inf = torch.ones(())
    device.step()
    del device.found_inf
    for name, p in device_model.named_parameters():
        assert torch.equal(p, before[name]), name
    state_after = [(k, v) for s in device.state.values() for k, v in s.items()]
    assert len(state_after) == len(state_before)
    assert all(k == k0 and torch.equal(v, v0) for (k, v), (k0, v0) in zip(state_after, state_before))
    steps = [s["step"] for s in device.state.values() if "step" in s]
    assert steps and all(float(s) == 3.0 for s in steps)
