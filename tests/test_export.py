"""ONNX export (dynamic batch) against PyTorch, int8 quantisation of the Linear layers, the export-onnx command."""

import pytest
import torch

import vitlab
from vitlab.cli import main

from .conftest import randomize_

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from vitlab.compute.deploy import (  # noqa: E402
    OnnxModel,
    check_parity,
    export_onnx,
    prediction_agreement,
    quantize_int8,
)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    model = randomize_(vitlab.create_model("vit_ti16", img_size=32, depth=2, num_classes=10), std=0.1).eval()
    folder = tmp_path_factory.mktemp("onnx")
    path = export_onnx(model, folder / "model.onnx")
    return model, path


@pytest.mark.slow
def test_onnx_matches_pytorch_at_several_batch_sizes(exported):
    model, path = exported
    graph = onnx.load(str(path)).graph
    batch_dim = graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value  # symbolic batch
    parity = check_parity(model, OnnxModel(path), batch_sizes=(1, 5), tolerance=1e-5)
    assert parity.ok, parity
    assert not list(path.parent.glob(".*.tmp"))  # atomic write left nothing behind


@pytest.mark.slow
def test_int8_quantises_every_linear_and_stays_close(exported, tmp_path):
    model, path = exported
    int8_path = quantize_int8(path, tmp_path / "int8.onnx")
    ops = [n.op_type for n in onnx.load(str(int8_path)).graph.node]
    linears = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert ops.count("MatMulInteger") == linears
    assert ops.count("Conv") == 1  # the patch embedding stays float32
    images = torch.randn(64, 3, 32, 32)
    result = prediction_agreement(model, OnnxModel(int8_path), images)
    with torch.no_grad():
        scale = model(images).abs().max().item()
    assert result["max_abs_logit_diff"] < 0.05 * scale
    assert result["agreement"] >= 0.9


def test_prediction_agreement_counts_equal_top1():
    a = lambda x: x  # noqa: E731
    b = lambda x: x * torch.tensor([1.0, 1.0, -1.0])  # noqa: E731
    images = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.5, 2.0]])
    result = prediction_agreement(a, b, images, batch_size=3)
    assert result["agreement"] == 0.5
    assert result["max_abs_logit_diff"] == 4.0


@pytest.mark.slow
def test_export_onnx_command_with_weights_and_int8(tmp_path, capsys):
    from safetensors.torch import save_file

    model = randomize_(vitlab.create_model("vit_fmnist"), std=0.05)
    weights = tmp_path / "w.safetensors"
    save_file(model.state_dict(), str(weights))
    status = main(["export-onnx", "vit_fmnist", str(tmp_path / "m.onnx"), "--weights", str(weights),
                   "--int8", str(tmp_path / "m8.onnx")])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "-> OK" in out and (tmp_path / "m8.onnx").is_file()
    exported = OnnxModel(tmp_path / "m.onnx")
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(exported(x), model.eval()(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("argv,message", [
    (["export-onnx", "vit_nope", "x.onnx"], "neither a file nor a registered model"),
    (["export-onnx", "vit_ti16", "x.pt"], "must end in .onnx"),
    (["export-onnx", "vit_ti16", "x.onnx", "--weights", "/no/such.safetensors"], "no such file"),
])
def test_export_onnx_errors_are_one_line(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not list(tmp_path.iterdir())
