"""The oneDNN CPU path for Linear layers: it gives F.linear's values and gradients, is taken only where it should be,
and is swapped into a built model in place (same parameters, same state dict) and out again."""

import json

import pytest
import torch
import torch.nn.functional as F

import vitlab
from vitlab.compute import onednn
from vitlab.compute.onednn import OneDnnLinear, onednn_linear_available, set_onednn_linear

linear = onednn  # the module whose product and thresholds the tests patch

pytestmark = pytest.mark.skipif(not onednn_linear_available(), reason="this PyTorch build has no oneDNN linear")


@pytest.fixture
def calls(monkeypatch):
    """Count oneDNN products, with the size threshold lowered so that small test shapes take the fast path."""
    counter = {"n": 0}
    real = linear.onednn_product

    def counting(*args):
        counter["n"] += 1
        return real(*args)

    monkeypatch.setattr(linear, "onednn_product", counting)
    monkeypatch.setattr(linear, "ONEDNN_MIN_MACS", 0)
    monkeypatch.setattr(linear, "ONEDNN_MIN_FEATURES", 0)
    monkeypatch.setenv("VITLAB_ONEDNN_LINEAR", "1")  # the fast path on, whatever this machine's default
    return counter


@pytest.mark.parametrize("shape,bias,frozen", [((6, 40), True, False), ((3, 7, 40), True, False),
                                               ((2, 5, 40), False, False), ((4, 9, 40), True, True)])
def test_values_and_gradients_equal_f_linear(calls, shape, bias, frozen):
    layer = OneDnnLinear(40, 24, bias=bias)
    layer.weight.requires_grad_(not frozen)
    x = torch.randn(shape, requires_grad=True)
    y = layer(x)
    assert calls["n"] == 1
    grad_out = torch.randn_like(y)
    y.backward(grad_out)
    x_ref = x.detach().clone().requires_grad_(True)
    w_ref = layer.weight.detach().clone().requires_grad_(not frozen)
    b_ref = layer.bias.detach().clone().requires_grad_(True) if bias else None
    y_ref = F.linear(x_ref, w_ref, b_ref)
    y_ref.backward(grad_out)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=1e-5)
    assert calls["n"] == 1 + 1 + (0 if frozen else 1)  # forward, dx, dW
    if frozen:
        assert layer.weight.grad is None
    else:
        torch.testing.assert_close(layer.weight.grad, w_ref.grad, atol=1e-4, rtol=1e-5)
    if bias:
        torch.testing.assert_close(layer.bias.grad, b_ref.grad, atol=1e-5, rtol=1e-5)


def test_falls_back_where_onednn_does_not_apply(calls, monkeypatch):
    layer = OneDnnLinear(16, 8)
    x = torch.randn(4, 16)
    layer.double()(x.double())  # other dtypes
    layer.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16  # autocast keeps its own casting
    set_onednn_linear(layer, False)
    assert type(layer) is torch.nn.Linear
    layer(x)
    assert calls["n"] == 0
    set_onednn_linear(layer, True)
    assert type(layer) is OneDnnLinear
    monkeypatch.setattr(linear, "ONEDNN_MIN_MACS", 10**9)  # too small to be worth a oneDNN call
    layer(x)
    monkeypatch.setattr(linear, "ONEDNN_MIN_MACS", 0)
    monkeypatch.setattr(linear, "ONEDNN_MIN_FEATURES", 128)  # too narrow
    layer(x)
    assert calls["n"] == 0


def test_model_logits_and_state_dict_unchanged_by_the_fast_path(calls):
    model = vitlab.create_model("vit_ti16", img_size=32, depth=2, num_classes=5).eval()
    torch.nn.init.normal_(model.head.weight)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        fast = model(x)
        assert calls["n"] == 2 * 4 + 1  # qkv, proj, fc1, fc2 per block, and the head
        slow = set_onednn_linear(model, False)(x)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    assert all(isinstance(m, torch.nn.Linear) for m in (model.head, model.blocks[0].mlp.fc1))
    assert "blocks.0.attn.qkv.weight" in model.state_dict()


@pytest.mark.slow
def test_compiled_training_step_matches_eager(calls):
    torch.manual_seed(0)
    layer = set_onednn_linear(torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 8)))
    x = torch.randn(5, 32)
    eager = layer(x).square().sum()
    eager.backward()
    eager_grads = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    compiled = torch.compile(layer, fullgraph=True)  # inductor: the backward products must stay opaque too
    out = compiled(x).square().sum()
    out.backward()
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)
    for p, g in zip(layer.parameters(), eager_grads):
        torch.testing.assert_close(p.grad, g, atol=1e-4, rtol=1e-5)


def test_the_swap_keeps_parameters_and_state_dict_and_models_stay_plain(calls):
    plain = vitlab.models.create_model("vit_ti16", img_size=32, depth=2, num_classes=5)
    assert all(type(m) is not OneDnnLinear for m in plain.modules())  # the model files use nn.Linear
    params = {name: p for name, p in plain.named_parameters()}
    state = {k: v.clone() for k, v in plain.state_dict().items()}
    fast = set_onednn_linear(plain)
    assert fast is plain and type(plain.blocks[1].mlp.fc2) is OneDnnLinear and type(plain.head) is OneDnnLinear
    assert all(p is params[name] for name, p in plain.named_parameters())  # the same parameter objects
    assert plain.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in plain.state_dict().items())
    set_onednn_linear(plain, False)
    assert all(type(m) is not OneDnnLinear for m in plain.modules())
    assert type(vitlab.create_model("vit_ti16", img_size=32, depth=2).head) is OneDnnLinear  # the default, here on


def _rounds(onednn_forward: float, onednn_backward: float, linear_forward: float = 1.0,
            linear_backward: float = 2.0, count: int = 3, unit: float = 1e-4) -> list[dict[str, float]]:
    """Timings of ``count`` alternating rounds, in units of 0.1 ms (a 2^24-MAC product at 335 GFLOP/s)."""
    return [{"onednn_forward": onednn_forward * unit, "onednn_backward": onednn_backward * unit,
             "linear_forward": linear_forward * unit, "linear_backward": linear_backward * unit}] * count


def test_the_choice_needs_a_clear_measured_win():
    # ratios are oneDNN's time over F.linear's: the median of the rounds, so that one preempted round does not decide
    outlier = {"onednn_forward": 9.0, "onednn_backward": 9.0, "linear_forward": 1.0, "linear_backward": 2.0}
    rounds = _rounds(0.5, 1.0, unit=1, count=4) + [outlier]
    assert linear.median_ratios(rounds) == {"forward": 0.5, "use": 0.5, "forward_high": 0.5, "use_high": 0.5}
    assert linear.decide(linear.median_ratios(rounds)) == "on"  # one preempted round in five does not decide
    scattered = linear.median_ratios(_rounds(0.5, 1.0, unit=1, count=3) + [outlier, outlier])
    assert scattered["forward"] == 0.5 and linear.decide(scattered) == "off"  # a good median is not enough
    decide = lambda f, u: linear.decide({"forward_high": f, "use_high": u})  # noqa: E731
    assert decide(0.5, 0.5) == "on"
    assert decide(0.5, 1.2) == "inference"  # forward wins, backward products lose
    assert decide(0.95, 0.5) == "off"  # within the noise margin: never a slowdown
    assert decide(1.3, 0.5) == "off"


@pytest.fixture
def measured(monkeypatch, tmp_path):
    """No environment setting, the cache under a temporary $VITLAB_HOME, and injected timings per shape."""
    monkeypatch.delenv("VITLAB_ONEDNN_LINEAR", raising=False)
    monkeypatch.setenv("VITLAB_HOME", str(tmp_path))
    monkeypatch.setattr(linear, "_CHOICES", {})
    timings = {}
    asked = []

    def measure(fan_in, fan_out, budget_s):
        asked.append((fan_in, fan_out))
        assert 0 < budget_s <= linear.CALIBRATION_BUDGET_S
        return timings.get((fan_in, fan_out), _rounds(2.0, 4.0))  # default: oneDNN twice as slow

    monkeypatch.setattr(linear, "measure_shape", measure)
    return timings, asked


def test_measured_choices_are_cached_per_machine_and_reused(measured, tmp_path, monkeypatch):
    timings, asked = measured
    timings[(192, 576)] = _rounds(0.5, 1.0)  # qkv: faster both ways
    timings[(192, 768)] = _rounds(0.5, 3.0)  # fc1: faster forward only
    model = vitlab.create_model("vit_ti16", img_size=32, depth=2, num_classes=5)
    block = model.blocks[0]
    assert type(block.attn.qkv) is OneDnnLinear and block.attn.qkv.onednn_training
    assert type(block.mlp.fc1) is OneDnnLinear and not block.mlp.fc1.onednn_training
    assert type(block.attn.proj) is torch.nn.Linear and type(block.mlp.fc2) is torch.nn.Linear
    assert type(model.head) is torch.nn.Linear  # 5 classes: too narrow to measure
    assert sorted(asked) == [(192, 192), (192, 576), (192, 768), (768, 192)]  # each shape once, not per block
    cache = json.loads(linear.calibration_path().read_text())
    entries = cache["machines"][linear.machine_key()]
    assert linear.calibration_path() == tmp_path / "kernels" / "onednn_linear.json"
    assert entries["192x576"]["choice"] == "on" and entries["192x768"]["choice"] == "inference"
    assert entries["192x192"] == {"choice": "off", "forward_ratio": 2.0, "use_ratio": 2.0, "forward_high_ratio": 2.0,
                                  "use_high_ratio": 2.0, "rows": linear.calibration_rows(192, 192)}
    asked.clear()
    vitlab.create_model("vit_ti16", img_size=32, depth=1)  # the same shapes and the 1000-class head
    assert asked == [(192, 1000)]
    monkeypatch.setattr(linear, "_CHOICES", {})  # a new process reads the file
    assert linear.linear_choices([(192, 576), (192, 768)]) == {(192, 576): "on", (192, 768): "inference"}
    assert asked == [(192, 1000)]
    monkeypatch.setenv("VITLAB_ONEDNN_LINEAR", "0")  # the environment still decides when set
    assert type(vitlab.create_model("vit_ti16", img_size=32, depth=1).blocks[0].attn.qkv) is torch.nn.Linear
    monkeypatch.setenv("VITLAB_ONEDNN_LINEAR", "1")
    assert type(vitlab.create_model("vit_ti16", img_size=32, depth=1).blocks[0].attn.proj) is OneDnnLinear
    assert asked == [(192, 1000)]


def test_a_models_kernels_are_recorded_per_shape_with_what_decided_them(measured, monkeypatch):
    timings, _ = measured
    timings[(192, 576)] = _rounds(0.5, 1.0)
    timings[(192, 768)] = _rounds(0.5, 3.0)
    record = linear.linear_kernels(vitlab.create_model("vit_ti16", img_size=32, depth=1, num_classes=5))
    assert record["shapes"] == {"192x192": "F.linear", "192x576": "oneDNN", "192x5": "F.linear",
                                "192x768": "oneDNN (inference only)", "768x192": "F.linear"}
    assert record["decided_by"].startswith("measured on this CPU (" + linear.machine_key())
    assert str(linear.calibration_path()) in record["decided_by"]
    line = linear.describe_linear_kernels(record)
    assert line.startswith("Linear kernels (float32 CPU): F.linear for 192x192, 192x5, 768x192; oneDNN for 192x576; "
                           "oneDNN (inference only) for 192x768 (measured on this CPU")
    monkeypatch.setenv("VITLAB_ONEDNN_LINEAR", "0")
    record = linear.linear_kernels(vitlab.create_model("vit_ti16", img_size=32, depth=1, num_classes=5))
    assert set(record["shapes"].values()) == {"F.linear"} and record["decided_by"] == "VITLAB_ONEDNN_LINEAR=0"


def test_a_corrupt_cache_file_is_ignored_and_rewritten(measured):
    _, asked = measured
    path = linear.calibration_path()
    for content in (b"{not json", b"[1, 2]", b'{"version": 2, "machines": {"x": {"1x2": {"choice": "maybe"}}}}'):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        linear._CHOICES.clear()
        assert linear.linear_choices([(256, 256)]) == {(256, 256): "off"}
        data = json.loads(path.read_text())
        assert data["version"] == linear.CALIBRATION_VERSION
        assert list(data["machines"][linear.machine_key()]) == ["256x256"]
    assert asked == [(256, 256)] * 3
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]  # atomic writes leave nothing


def test_a_measurement_disturbed_by_other_load_keeps_f_linear_and_is_not_cached(measured, monkeypatch):
    timings, asked = measured
    # oneDNN "faster", but F.linear's 2^24-MAC product took 20 ms (1.7 GFLOP/s): threads waiting for busy cores
    timings[(256, 256)] = _rounds(0.5, 1.0, unit=0.02)
    assert linear.linear_choices([(256, 256), (512, 512)]) == {(256, 256): "off", (512, 512): "off"}
    assert asked == [(256, 256)]  # too busy to measure: the other shapes are not tried in this process either
    assert linear.linear_choices([(256, 256)]) == {(256, 256): "off"} and len(asked) == 1  # once per process
    assert not linear.calibration_path().exists()
    monkeypatch.setattr(linear, "_CHOICES", {})
    timings[(256, 256)] = _rounds(0.5, 1.0)  # a quiet machine
    assert linear.linear_choices([(256, 256)]) == {(256, 256): "on"} and len(asked) == 2


def test_inference_only_layers_use_f_linear_when_autograd_records(calls):
    layer = set_onednn_linear(torch.nn.Linear(40, 24), True)
    layer.onednn_training = False
    x = torch.randn(3, 40)
    with torch.no_grad():
        layer(x)
    assert calls["n"] == 1
    layer(x).sum().backward()  # the weight needs a gradient: F.linear forward and backward
    assert calls["n"] == 1 and layer.weight.grad is not None
    set_onednn_linear(layer, True)  # an explicit choice takes oneDNN both ways again
    assert layer.onednn_training


def test_a_bad_environment_setting_is_refused_naming_the_variable(monkeypatch):
    from vitlab.errors import InvalidValueError

    monkeypatch.setenv("VITLAB_ONEDNN_LINEAR", "yes")
    with pytest.raises(InvalidValueError, match=r"VITLAB_ONEDNN_LINEAR='yes': use 1 \(oneDNN fast path on\) or 0"):
        vitlab.create_model("vit_ti16", img_size=32, depth=1)



def test_a_shape_is_measured_on_the_cpu_whatever_the_default_device(monkeypatch):
    # under torch.set_default_device("cuda") the products would be drawn on the GPU (the meta device stands in)
    seen, product = [], linear.onednn_product
    monkeypatch.setattr(linear, "onednn_product", lambda x, w, b=None: seen.append(x.device.type) or product(x, w, b))
    with torch.device("meta"):
        rounds = linear.measure_shape(128, 128, budget_s=0.0)
    assert len(rounds) == linear.CALIBRATION_ROUNDS[0] and set(seen) == {"cpu"}
