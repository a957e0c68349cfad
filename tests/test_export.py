"""ONNX export (dynamic batch) against PyTorch, int8 quantisation of the Linear layers, the export-onnx command."""

import json
from pathlib import Path

import pytest
import torch

import vitlab
from vitlab.cli import main

from .conftest import randomize_

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from vitlab.compute import deploy  # noqa: E402
from vitlab.compute.deploy import (  # noqa: E402
    INT8_KEY,
    Int8AccuracyWarning,
    OnnxModel,
    check_parity,
    choose_weight_type,
    cpu_features,
    export_onnx,
    prediction_agreement,
    quantize_int8,
)
from vitlab.errors import InvalidValueError, VitlabError  # noqa: E402


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


def test_int8_quantisation_prints_no_onnx_runtime_preprocessing_advice(exported, tmp_path, caplog):
    """ONNX Runtime logs "Please consider to run pre-processing before quantization" on the root logger at every
    call: a ``WARNING:root:`` line under `vitlab export-onnx --int8` and `vitlab serve --backend onnx-int8`."""
    import logging

    filters = list(logging.getLogger().filters)
    with caplog.at_level(logging.INFO):
        quantize_int8(exported[1], tmp_path / "int8.onnx")
    assert not [r for r in caplog.records if "pre-processing" in r.getMessage()]
    assert logging.getLogger().filters == filters  # the filter is gone again


def _weight_dtypes(proto) -> set[int]:
    """The element types of the weights the MatMulInteger nodes read (their second input, an initializer)."""
    initializers = {t.name: t.data_type for t in proto.graph.initializer}
    return {initializers[n.input[1]] for n in proto.graph.node if n.op_type == "MatMulInteger"}


@pytest.mark.slow
@pytest.mark.parametrize("weights", ["auto", "signed", "unsigned"])
def test_int8_quantises_every_linear_and_stays_close(exported, tmp_path, weights):
    model, path = exported
    int8_path = quantize_int8(path, tmp_path / "int8.onnx", weights=weights)
    proto = onnx.load(str(int8_path))
    ops = [n.op_type for n in proto.graph.node]
    linears = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert ops.count("MatMulInteger") == linears
    assert ops.count("Conv") == 1  # the patch embedding stays float32
    # the weight type asked for (auto: this CPU's) is what the file holds and what its metadata says
    chosen = choose_weight_type(weights)
    assert _weight_dtypes(proto) == {onnx.TensorProto.INT8 if chosen == "signed" else onnx.TensorProto.UINT8}
    record = json.loads(next(p.value for p in proto.metadata_props if p.key == INT8_KEY))
    machine, flags = cpu_features()
    assert record["weights"] == chosen and record["requested"] == weights
    assert record["chosen_for"]["machine"] == machine and record["chosen_for"]["vnni"] == deploy.has_vnni(flags)
    assert json.loads(next(p.value for p in proto.metadata_props if p.key == "vitlab"))["quantization"].endswith(chosen)
    if chosen == "signed" and choose_weight_type("auto") == "unsigned":
        # the case this choice exists for: loading it here says so, once
        with pytest.warns(Int8AccuracyWarning, match="signed weights on a CPU without VNNI"):
            OnnxModel(int8_path)
        pytest.skip("signed int8 weights saturate on this CPU (x86 without VNNI): accuracy not checked")
    images = torch.randn(64, 3, 32, 32)
    result = prediction_agreement(model, OnnxModel(int8_path), images)
    with torch.no_grad():
        scale = model(images).abs().max().item()
    assert result["max_abs_logit_diff"] < 0.05 * scale
    assert result["agreement"] >= 0.9


@pytest.mark.parametrize("machine,flags,expected", [
    ("x86_64", {"avx2", "fma"}, "unsigned"),  # AMD Zen 3: AVX2 only
    ("x86_64", {"avx2", "avx512f", "avx512bw"}, "unsigned"),  # AVX-512 without VNNI (Skylake-SP)
    ("x86_64", {"avx2", "avx512f", "avx512_vnni"}, "signed"),  # AMD Zen 4 / 5, Cascade Lake and later Xeons
    ("x86_64", {"avx2", "avx_vnni"}, "signed"),  # AVX-VNNI only (Alder Lake)
    ("x86_64", {"avx2", "amx_int8"}, "signed"),
    ("AMD64", {"avx512_vnni"}, "signed"),  # Windows spelling of the machine
    ("x86_64", None, "unsigned"),  # flags unknown: the choice that is exact everywhere
    ("aarch64", {"fp", "asimd", "asimddp"}, "signed"),  # ARM kernels accumulate in 32 bits
    ("arm64", None, "signed"),
])
def test_auto_int8_weights_follow_the_cpus_vnni(machine, flags, expected):
    assert choose_weight_type("auto", machine, flags) == expected
    assert choose_weight_type("signed", machine, flags) == "signed"
    assert choose_weight_type("unsigned", machine, flags) == "unsigned"


def test_int8_weight_type_is_checked_and_signed_files_warn_once_without_vnni(monkeypatch, tmp_path):
    with pytest.raises(InvalidValueError, match="int8 weights must be one of auto, signed, unsigned; got 'u8'"):
        choose_weight_type("u8")
    monkeypatch.setattr(deploy, "_warned", set())
    signed = {"weights": "signed"}
    with pytest.warns(Int8AccuracyWarning, match=r"m8.onnx: int8 with signed weights on a CPU without VNNI .*"
                                                 r"--int8-weights unsigned"):
        assert deploy.warn_if_saturating(tmp_path / "m8.onnx", signed, "x86_64", {"avx2"})
    assert not deploy.warn_if_saturating(tmp_path / "m8.onnx", signed, "x86_64", {"avx2"})  # once per file
    assert not deploy.warn_if_saturating(tmp_path / "u8.onnx", {"weights": "unsigned"}, "x86_64", {"avx2"})
    assert not deploy.warn_if_saturating(tmp_path / "v8.onnx", signed, "x86_64", {"avx512_vnni"})
    assert not deploy.warn_if_saturating(tmp_path / "f32.onnx", None, "x86_64", {"avx2"})
    # a file quantised before the weight type was recorded had signed weights
    old = {"vitlab": json.dumps({"quantization": "int8 dynamic (ONNX Runtime), MatMul / Gemm weights"})}
    assert deploy.read_int8_record(old)["weights"] == "signed"
    assert deploy.read_int8_record({"vitlab": json.dumps({"config": {}})}) is None


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
                   "--int8", str(tmp_path / "m8.onnx"), "--int8-weights", "unsigned"])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "-> OK" in out and "(int8 Linear layers, unsigned weights)" in out
    assert OnnxModel(tmp_path / "m8.onnx").int8["weights"] == "unsigned"
    exported = OnnxModel(tmp_path / "m.onnx")
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(exported(x), model.eval()(x), atol=1e-4, rtol=1e-4)


def test_export_onnx_weights_of_another_size_are_one_line(capsys, tmp_path, monkeypatch):
    """--weights for the registered model at another size (here fewer classes) was load_state_dict's traceback."""
    from safetensors.torch import save_file

    monkeypatch.chdir(tmp_path)
    save_file(vitlab.create_model("vit_fmnist", num_classes=3).state_dict(), "w.safetensors")
    assert main(["export-onnx", "vit_fmnist", "x.onnx", "--weights", "w.safetensors"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "w.safetensors: the weights do not fit the model; wrong shapes (2)" in err
    assert "head.weight (3, 96) vs model (10, 96)" in err and not Path("x.onnx").exists()


@pytest.mark.parametrize("argv,message", [
    (["export-onnx", "vit_nope", "x.onnx"], "neither a file nor a registered model"),
    (["export-onnx", "vit_ti16", "x.pt"], "must end in .onnx"),
    (["export-onnx", "vit_ti16", "x.onnx", "--weights", "/no/such.safetensors"], "no such file"),
    (["export-onnx", "vit_ti16", "x.onnx", "--int8-weights", "signed"], "--int8-weights needs --int8 FILE"),
])
def test_export_onnx_errors_are_one_line(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not list(tmp_path.iterdir())


def test_exported_files_given_where_a_checkpoint_is_needed_say_so(exported, tmp_path, capsys):
    """`vitlab info / inspect / convert` on an .onnx file said "unrecognised file type", on a .pt2 package listed
    its zip members; `vitlab fewshot` / `suite` on one was an AttributeError (no forward_head)."""
    import zipfile

    from vitlab.evaluate.features import output_function

    pt2 = tmp_path / "model.pt2"  # the layout AOTInductor writes, without compiling one
    with zipfile.ZipFile(pt2, "w") as archive:
        archive.writestr("archive/data/aotinductor/model/x.wrapper.cpp", "// kernels")
    for path, kind in ((exported[1], "an ONNX file"), (pt2, "a PyTorch .pt2 package (AOTInductor)")):
        assert main(["info", str(path)]) == 2
        err = capsys.readouterr().err
        assert err == (f"vitlab info: error: {path}: {kind}, not a checkpoint: vitlab predict, eval and serve take "
                       "exported models; this command needs the checkpoint it was exported from\n")
    with pytest.raises(VitlabError, match="representation 'pre_logits' needs the PyTorch model; an exported"):
        output_function(OnnxModel(exported[1]), "pre_logits")
