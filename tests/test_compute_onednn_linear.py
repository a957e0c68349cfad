"""The oneDNN CPU path for Linear layers: it gives F.linear's values and gradients, is taken only where it should be,
and is swapped into a built model in place (same parameters, same state dict) and out again."""

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


@pytest.mark.parametrize("vendor,setting,expected", [("AuthenticAMD", None, True), ("GenuineIntel", None, False),
                                                     ("", None, False), ("GenuineIntel", "1", True),
                                                     ("AuthenticAMD", "0", False)])
def test_the_default_is_on_for_amd_cpus_and_the_environment_decides_when_set(monkeypatch, vendor, setting,
                                                                             expected):
    monkeypatch.setattr(linear, "cpu_vendor", lambda: vendor)
    if setting is None:
        monkeypatch.delenv("VITLAB_ONEDNN_LINEAR", raising=False)
    else:
        monkeypatch.setenv("VITLAB_ONEDNN_LINEAR", setting)
    assert linear.onednn_linear_default() is expected
    model = vitlab.create_model("vit_ti16", img_size=32, depth=1)
    assert (type(model.head) is OneDnnLinear) is expected
    assert type(set_onednn_linear(model, True).head) is OneDnnLinear  # an explicit choice overrides the default


def test_a_bad_environment_setting_is_refused_naming_the_variable(monkeypatch):
    from vitlab.errors import InvalidValueError

    monkeypatch.setenv("VITLAB_ONEDNN_LINEAR", "yes")
    with pytest.raises(InvalidValueError, match=r"VITLAB_ONEDNN_LINEAR='yes': use 1 \(oneDNN fast path on\) or 0"):
        vitlab.create_model("vit_ti16", img_size=32, depth=1)

