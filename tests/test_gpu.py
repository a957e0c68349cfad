"""The CUDA paths against the CPU float32 result: autocast logits and training steps in bf16 / fp16, the fused SDPA
kernels, ``torch.compile`` parity, FSDP on one GPU, the memory gradient checkpointing saves, and an exact resume.

``pytest -m gpu tests/test_gpu.py`` on a CUDA machine (``benchmarks/gpu_suite.py`` runs it and reports the numbers
each test records); without CUDA every test here skips. ``VITLAB_GPU_TEST_DEVICE=cpu`` runs the same checks on the
CPU at tiny sizes (the suite's ``--dry-run`` does, in CI), so that they cannot break unseen.

Tolerances are relative errors of whole tensors, ``||a - b|| / ||b||`` (:func:`rel_error`), against the CPU float32
result of the same weights and inputs, or against the eager result for ``torch.compile``; :data:`TOL` states them.
"""

import os
import signal

import pytest
import torch
import torch.distributed as dist
from torch.nn.attention import SDPBackend, sdpa_kernel

from vitlab.compute.bench import peak_memory_bytes
from vitlab.compute.memory import activation_bytes_per_image
from vitlab.models import create_model
from vitlab.train import distributed as D
from vitlab.train import train
from vitlab.train.config import RULES
from vitlab.train.run import build_run
from vitlab.train.runlog import RunLog
from vitlab.train.step import train_step

from .conftest import randomize_
from .test_train import TINY_MODEL, tiny_config
from .train_runs import same_tensors

ON_CPU = os.environ.get("VITLAB_GPU_TEST_DEVICE", "cuda") == "cpu"
DEVICE = torch.device("cpu") if ON_CPU else torch.device("cuda", 0)
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not ON_CPU and not torch.cuda.is_available(),
                                 reason="needs a CUDA device (VITLAB_GPU_TEST_DEVICE=cpu runs these on the CPU)")]
if not ON_CPU and torch.cuda.is_available():
    # cuBLAS reads this when it starts: deterministic matrix products for the exact-resume test
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# relative error allowed against the CPU float32 result. fp32 on CUDA: cuDNN's convolution (the patch embedding) may
# use TF32 (PyTorch's default). bf16 keeps 8 mantissa bits (unit roundoff 2^-8 = 3.9e-3), fp16 11 (4.9e-4): a few
# dozen roundings through the blocks stay within about ten times the unit roundoff.
TOL = {
    "logits": {"fp32": 2e-3, "bf16": 4e-2, "fp16": 5e-3},
    "step": {"fp32": 2e-3, "bf16": 6e-2, "fp16": 1e-2},      # the weight change of two SGD steps
    "compile_logits": {"fp32": 1e-4, "bf16": 2e-2},          # compiled against eager, same device and precision
    "compile_step": {"fp32": 1e-4, "bf16": 6e-2},
    "fsdp_step": 1e-5,                                       # FSDP over one rank against the plain model, fp32
    # measured / expected memory saved: the saved activations of vitlab.compute.memory (and in bf16 autocast's
    # weight copies, which the blocks' saved tensors hold without checkpointing)
    "checkpointing_saving": (0.7, 1.3),
}
# the GPU precision of the compile, memory and resume checks (the CPU dry run checks float32)
GPU_PRECISION = "fp32" if ON_CPU else "bf16"


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` in float64 on the CPU."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def classifier(depth: int | None = None):
    """A randomised ViT (every weight non-zero, so every weight is checked) and its input: ViT-S/16 at 224 on a
    GPU (``depth`` blocks: fewer keep Inductor's compilation short), a two-block width-64 one at 32 px on the CPU."""
    if ON_CPU:
        model = create_model("vit_ti16", img_size=32, depth=2, embed_dim=64, num_heads=2, mlp_dim=128,
                             num_classes=10)
    else:
        model = create_model("vit_s16", num_classes=100, **({"depth": depth} if depth else {}))
    randomize_(model, std=0.05)
    size = model.cfg.img_size
    return model.eval(), torch.randn(8, 3, *size, generator=torch.Generator().manual_seed(3))


def autocast(precision: str):
    return torch.autocast(DEVICE.type, dtype=DTYPES[precision], enabled=precision != "fp32")


@pytest.fixture(autouse=True)
def _restore_determinism():
    """``train(deterministic=True)`` switches deterministic algorithms on for the process: off again after."""
    before = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(before)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_autocast_logits_match_the_cpu_float32_logits(precision, record_property):
    model, x = classifier()
    with torch.inference_mode():
        expected = model(x)
    model.to(DEVICE)
    with torch.inference_mode(), autocast(precision):
        got = model(x.to(DEVICE))
    err = rel_error(got.float(), expected)
    record_property("rel_error", round(err, 6))
    record_property("tolerance", TOL["logits"][precision])
    assert got.dtype == (torch.float32 if precision == "fp32" else DTYPES[precision])
    assert err <= TOL["logits"][precision]


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_image_text_zero_shot_logits_match_the_cpu_float32_logits(precision, record_property):
    """Both towers of a CLIP-shaped model (the causal text tower cut after the end-of-text token, the image tower with
    its projection) under autocast: logits per image against the CPU float32 ones."""
    from vitlab.image_text import create_image_text
    from vitlab.models.text import TextConfig

    if ON_CPU:
        text = TextConfig(vocab_size=1000, context_length=16, embed_dim=64, depth=2, num_heads=2, mlp_dim=128,
                          proj_dim=32, eos_id=999)
        model = create_image_text("clip_b16", text, img_size=32, depth=2, embed_dim=64, num_heads=2, mlp_dim=128,
                                  num_classes=32)
    else:
        text = TextConfig(eos_id=49407)
        model = create_image_text("clip_b16", text)
    randomize_(model, std=0.05)
    model.eval()
    gen = torch.Generator().manual_seed(4)
    tokens = torch.randint(1, text.vocab_size - 1, (6, text.context_length), generator=gen)
    tokens[:, 7] = text.eos_id
    images = torch.randn(4, 3, *model.visual.cfg.img_size, generator=gen)
    with torch.inference_mode():
        expected = model(images, tokens)
    model.to(DEVICE)
    with torch.inference_mode(), autocast(precision):
        got = model(images.to(DEVICE), tokens.to(DEVICE))
    err = rel_error(got.float(), expected)
    record_property("rel_error", round(err, 6))
    record_property("tolerance", TOL["logits"][precision])
    assert err <= TOL["logits"][precision]


def _step_run(tmp_path, name, device: str, **changes):
    cfg = tiny_config(tmp_path, run_name=name, device=device, optimizer="sgd", momentum=0.0, lr=0.1,
                      warmup_steps=0, schedule="constant", grad_clip=0.0, label_smoothing=0.0, **changes)
    run_dir = tmp_path / name
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    return build_run(cfg, D.setup(device), run_dir, RunLog(run_dir, console=False))


def _two_steps(run) -> tuple[list[torch.Tensor], list[float]]:
    """The change of every parameter over two training steps (the head starts at zero: the second step is the first
    to reach the encoder) and the two losses."""
    before = [p.detach().cpu().clone() for p in run.model.parameters()]
    batches = run.loader.epoch(0)
    losses = [float(train_step(run, batches, step).loss) for step in range(2)]
    return [p.detach().cpu() - b for p, b in zip(run.model.parameters(), before)], losses


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_training_step_matches_the_cpu_float32_step(precision, tmp_path, record_property):
    if precision not in RULES["precision"].choices:
        pytest.skip(f"this vitlab has no precision={precision} training yet")
    reference, ref_losses = _two_steps(_step_run(tmp_path, "cpu", "cpu", precision="fp32"))
    run = _step_run(tmp_path, precision, DEVICE.type, precision=precision)
    assert run.precision == precision
    changes, losses = _two_steps(run)
    err = rel_error(torch.cat([c.flatten() for c in changes]), torch.cat([r.flatten() for r in reference]))
    record_property("update_rel_error", round(err, 6))
    record_property("loss_diff", round(max(abs(a - b) for a, b in zip(losses, ref_losses)), 6))
    record_property("tolerance", TOL["step"][precision])
    assert err <= TOL["step"][precision]
    assert losses == pytest.approx(ref_losses, rel=TOL["step"][precision])


def _attention_ops(model, x) -> dict[str, int]:
    """aten attention kernels a forward and backward of ``model`` called, by name, and how often."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with autocast(GPU_PRECISION):
            out = model(x)
        out.float().square().mean().backward()
    return {e.key: e.count for e in prof.key_averages() if "attention" in e.key and e.key.startswith("aten::_")}


def test_attention_runs_on_the_flash_or_memory_efficient_kernel(record_property):
    model, x = classifier()
    model = model.to(DEVICE).train()
    x = x.to(DEVICE)
    with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]), autocast(GPU_PRECISION):
        expected = model(x).float()
    usable = {}
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        try:
            with torch.no_grad(), sdpa_kernel([backend]), autocast(GPU_PRECISION):
                usable[backend.name] = rel_error(model(x).float(), expected)
        except RuntimeError:  # "No available kernel": this backend cannot run these inputs here
            usable[backend.name] = None
    record_property("rel_error_vs_math", {k: v if v is None else round(v, 6) for k, v in usable.items()})
    assert any(v is not None for v in usable.values()), "neither flash nor memory-efficient attention ran"
    assert all(v <= TOL["logits"][GPU_PRECISION] for v in usable.values() if v is not None)
    # the model's own attention (not a hand-written one) goes through the fused kernels, forward and backward,
    # once per block, when only they are allowed
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        ops = _attention_ops(model, x)
    record_property("kernels", ops)
    fused = {k: n for k, n in ops.items() if "flash" in k or "efficient" in k}
    assert any(not k.endswith("_backward") and n == model.cfg.depth for k, n in fused.items()), ops
    assert any(k.endswith("_backward") and n == model.cfg.depth for k, n in fused.items()), ops


def test_compiled_inference_matches_eager(record_property):
    model, x = classifier(depth=4)
    model, x = model.to(DEVICE), x.to(DEVICE)
    compiled = torch.compile(model)
    with torch.inference_mode(), autocast(GPU_PRECISION):
        expected, got = model(x).float(), compiled(x).float()
    err = rel_error(got, expected)
    record_property("rel_error", round(err, 8))
    record_property("tolerance", TOL["compile_logits"][GPU_PRECISION])
    assert err <= TOL["compile_logits"][GPU_PRECISION]


def test_compiled_training_step_matches_eager(tmp_path, record_property):
    eager = _step_run(tmp_path, "eager", DEVICE.type, precision=GPU_PRECISION)
    compiled = _step_run(tmp_path, "compiled", DEVICE.type, precision=GPU_PRECISION, compile=True)
    assert compiled.forward is not compiled.trainable and eager.forward is eager.trainable
    reference, ref_losses = _two_steps(eager)
    changes, losses = _two_steps(compiled)
    err = rel_error(torch.cat([c.flatten() for c in changes]), torch.cat([r.flatten() for r in reference]))
    record_property("update_rel_error", round(err, 8))
    record_property("tolerance", TOL["compile_step"][GPU_PRECISION])
    assert err <= TOL["compile_step"][GPU_PRECISION]
    assert losses == pytest.approx(ref_losses, rel=TOL["compile_step"][GPU_PRECISION])


def _one_process_group() -> None:
    """A process group of one (what torchrun would start with --nproc_per_node=1), NCCL on a GPU, gloo on the CPU."""
    store = dist.HashStore()
    if DEVICE.type == "cuda":
        torch.cuda.set_device(DEVICE)
        dist.init_process_group("nccl", store=store, rank=0, world_size=1, device_id=DEVICE)
    else:
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)


def test_fsdp_over_one_gpu_trains_the_weights_of_the_plain_model(tmp_path, record_property):
    from torch.distributed.tensor import DTensor

    cfg = tiny_config(tmp_path, device=DEVICE.type, precision="fp32", epochs=None, steps=6, eval_every_epochs=0,
                      optimizer="adamw", grad_clip=1.0, deterministic=True)
    _one_process_group()
    try:  # vitlab's wrap shards every block and the root over the group's one rank
        info = D.DistInfo(0, 1, 0, DEVICE)
        sharded = D.wrap(create_model("vit_fmnist", img_size=8, **TINY_MODEL).to(DEVICE), info, fsdp=True)
        assert all(isinstance(p, DTensor) for p in sharded.parameters())
    finally:
        dist.destroy_process_group()
    plain = train(cfg.replace(run_name="plain"))
    _one_process_group()  # train() ends the group when it finishes, as it does under torchrun
    fsdp = train(cfg.replace(run_name="fsdp", fsdp=True))
    assert not dist.is_initialized()
    assert fsdp.steps == plain.steps == 6
    different = same_tensors(fsdp.model_path, plain.model_path)
    a, b = fsdp.model.state_dict(), plain.model.state_dict()
    assert list(a) == list(b)
    err = rel_error(torch.cat([a[k].flatten().float() for k in a]), torch.cat([b[k].flatten().float() for k in b]))
    record_property("rel_error", err)
    record_property("bitwise_equal", not different)
    assert err <= TOL["fsdp_step"]
    assert fsdp.metrics["top1"] == pytest.approx(plain.metrics["top1"], abs=0.01)


def _model_for_memory():
    """ViT-B/16 at 224, batch 16, bf16 on a GPU; a four-block width-64 ViT at 64 px, batch 16, float32 on the CPU."""
    if ON_CPU:
        model = create_model("vit_ti16", img_size=64, depth=4, embed_dim=64, num_heads=2, mlp_dim=256, num_classes=10)
    else:
        model = create_model("vit_b16", num_classes=10)
    return model.to(DEVICE).train(), torch.randn(16, 3, *model.cfg.img_size, device=DEVICE)


def test_gradient_checkpointing_saves_the_expected_activation_memory(record_property):
    model, x = _model_for_memory()

    def step():
        with autocast(GPU_PRECISION):
            loss = model(x).float().square().mean()
        loss.backward()
        model.zero_grad(set_to_none=True)

    step()  # workspaces and lazily made state exist before measuring
    peaks = {}
    for checkpointing in (False, True):
        model.set_grad_checkpointing(checkpointing)
        peaks[checkpointing] = peak_memory_bytes(step, DEVICE)
    bf16 = GPU_PRECISION == "bf16"
    expected = x.shape[0] * (activation_bytes_per_image(model.cfg, bf16, checkpointing=False)
                             - activation_bytes_per_image(model.cfg, bf16, checkpointing=True))
    if bf16:  # autocast's bf16 copies of the blocks' Linear weights, saved for the backward pass unless recomputed
        expected += 2 * sum(p.numel() for m in model.blocks.modules() if isinstance(m, torch.nn.Linear)
                            for p in m.parameters())
    ratio = (peaks[False] - peaks[True]) / expected
    record_property("peak_mb", {str(k): round(v / 2**20, 1) for k, v in peaks.items()})
    record_property("saved_mb", round((peaks[False] - peaks[True]) / 2**20, 1))
    record_property("expected_saved_mb", round(expected / 2**20, 1))
    record_property("ratio", round(ratio, 3))
    low, high = TOL["checkpointing_saving"]
    assert low <= ratio <= high


def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(tmp_path, monkeypatch, record_property):
    from vitlab.train import loop
    from vitlab.train.stop import RunStopped

    cfg = tiny_config(tmp_path, device=DEVICE.type, precision=GPU_PRECISION, epochs=None, steps=24,
                      eval_every_epochs=0, run_name="job", deterministic=True, ema_decay=0.9,
                      model_args={**TINY_MODEL, "dropout": 0.1})
    real_step = loop.train_step

    def signalled_step(run, batches, step):
        if step == 9:
            os.kill(os.getpid(), signal.SIGTERM)  # a scheduler's stop: the step completes, last.pt is written
        return real_step(run, batches, step)

    monkeypatch.setattr(loop, "train_step", signalled_step)
    with pytest.raises(RunStopped) as stopped:
        train(cfg, resume="auto")
    assert stopped.value.step == 10
    monkeypatch.setattr(loop, "train_step", real_step)
    resumed = train(cfg, resume="auto")
    reference = train(cfg.replace(run_name="reference"))
    different = same_tensors(resumed.model_path, reference.model_path)
    record_property("tensors_differing", len(different))
    assert resumed.steps == reference.steps == 24 and different == []
