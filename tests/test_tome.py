"""Token merging (vitlab.compute.tome): off means unchanged, merging duplicates is exact, the matching and the token
counts follow the paper, bad uses are refused."""

import contextlib
import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import randomize_
from vitlab.cli import main
from vitlab.compute import merge_tokens, token_counts
from vitlab.compute.tome import bipartite_matching, merge_matched, merging_block
from vitlab.errors import InvalidValueError, VitlabError
from vitlab.models import VisionTransformer, ViTConfig, create_model


def tiny(dtype=torch.float64, **changes) -> VisionTransformer:
    torch.manual_seed(0)
    cfg = ViTConfig(img_size=16, patch_size=4, in_chans=3, num_classes=5, embed_dim=32, depth=2, num_heads=4,
                    mlp_dim=64).replace(**changes)
    model = VisionTransformer(cfg).to(dtype).eval()
    with torch.no_grad():  # non-zero head and prefix tokens, so that the outputs depend on everything
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def test_r_zero_leaves_the_model_bit_identical():
    model = tiny(torch.float32)
    x = torch.randn(3, 3, 16, 16)
    before = model(x)
    state = copy.deepcopy(model.state_dict())
    merge_tokens(model, 2)
    assert type(model).__name__ == "TokenMergingVisionTransformer"
    assert not torch.equal(model(x), before)
    assert merge_tokens(model, 0) is model
    assert type(model) is VisionTransformer and "merge_r" not in model.__dict__
    assert torch.equal(model(x), before)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    merge_tokens(model, [0, 0])  # all zeros: also off
    assert type(model) is VisionTransformer


def test_merging_block_without_merging_is_the_block_bit_for_bit():
    model = tiny(torch.float32)
    x = torch.randn(2, 17, 32)
    y, size = merging_block(model.blocks[0], x, None, 0, prefix=1)
    assert size is None and torch.equal(y, model.blocks[0](x))


def duplicated(tokens: torch.Tensor, prefix: int) -> torch.Tensor:
    """Each patch token twice, side by side (one copy in set A, one in set B): (B, p + 2N, D)."""
    return torch.cat([tokens[:, :prefix], tokens[:, prefix:].repeat_interleave(2, dim=1)], dim=1)


def test_proportional_attention_makes_a_size_two_token_count_as_two_copies():
    model = tiny()
    block, x = model.blocks[0], torch.randn(2, 9, 32, dtype=torch.float64)  # class token + 8 patch tokens
    size = torch.cat([torch.ones(2, 1, 1), torch.full((2, 8, 1), 2.0)], dim=1).double()
    merged, out_size = merging_block(block, x, size, 0, prefix=1)
    reference = block(duplicated(x, 1))  # the plain block on the sequence with every patch token twice
    torch.testing.assert_close(merged[:, 1:], reference[:, 1::2], rtol=0, atol=1e-12)
    torch.testing.assert_close(merged[:, 0], reference[:, 0], rtol=0, atol=1e-12)  # the class token's output
    assert torch.equal(out_size, size)


@pytest.mark.parametrize("pool", ["token", "gap", "map"])
def test_merging_exact_duplicates_gives_the_unmerged_outputs(pool):
    """Duplicated patch tokens are merged by the first block (their keys are identical, so each is the other's
    best match); with proportional attention the rest of the model then computes what it computes on the
    duplicated sequence without merging: features, the class token, mean and attention pooling, logits."""
    model = tiny(pool=pool, class_token=pool == "token")
    p = model.num_prefix_tokens
    tokens = duplicated(model.embed(torch.randn(2, 3, 16, 16, dtype=torch.float64))[:, : p + 8], p)  # p + 16
    plain = model.norm(model.blocks[1](model.blocks[0](tokens)))
    expected_logits = model.forward_head(plain)
    merge_tokens(model, [8, 0])
    x, size = tokens, None
    for block, r in zip(model.blocks, model.merge_r):
        x, size = merging_block(block, x, size, r, p)
    x = model.norm(x)
    model.merged_sizes = size[:, p:]
    assert x.shape[1] == p + 8 and torch.equal(size[:, p:], torch.full((2, 8, 1), 2.0, dtype=torch.float64))
    torch.testing.assert_close(x[:, p:], plain[:, p + 1 :: 2], rtol=0, atol=1e-12)  # the B copies survive
    torch.testing.assert_close(x[:, :p], plain[:, :p], rtol=0, atol=1e-12)
    torch.testing.assert_close(model.pool(x), VisionTransformer.pool(model, plain), rtol=0, atol=1e-12)
    torch.testing.assert_close(model.forward_head(x), expected_logits, rtol=0, atol=1e-12)


def test_size_weighted_mean_pool_equals_the_mean_over_the_copies():
    model = merge_tokens(tiny(pool="gap", class_token=False), 1)
    tokens = torch.randn(1, 3, 32, dtype=torch.float64)
    model.merged_sizes = torch.tensor([[[1.0], [3.0], [2.0]]], dtype=torch.float64)
    copies = torch.cat([tokens[:, :1], tokens[:, 1:2].expand(-1, 3, -1), tokens[:, 2:3].expand(-1, 2, -1)], dim=1)
    torch.testing.assert_close(model.pool(tokens), copies.mean(dim=1), rtol=0, atol=1e-12)


def test_matching_merges_the_most_similar_pairs_into_their_partners():
    # A = positions 0, 2, 4, 6; B = 1, 3, 5, 7. A0 ~ B3 (cos 1), A1 ~ B0 (cos 0.99), A3 ~ B2
    # (cos 0.80), A2 orthogonal to every B token.
    e = torch.eye(8, dtype=torch.float64)
    a = [e[0], 0.99 * e[1] + 0.141 * e[2], e[4], e[5] + 0.2 * e[6]]
    b = [e[1], e[3], e[6] + 0.9 * e[5], e[0]]
    metric = torch.stack([t for pair in zip(a, b) for t in pair])[None]  # (1, 8, 8), alternating A, B
    kept, merged, into = bipartite_matching(metric, 2)
    assert merged.tolist() == [[0, 1]] and into.tolist() == [[3, 0]]
    assert kept.tolist() == [[3, 2]]  # the kept A tokens, most similar edge first
    x = torch.arange(8, dtype=torch.float64).reshape(1, 8, 1) * torch.ones(1, 1, 2, dtype=torch.float64)
    size = torch.tensor([1.0, 1, 1, 1, 1, 1, 1, 3], dtype=torch.float64).reshape(1, 8, 1)
    out, out_size = merge_matched(x, size, kept, merged, into)
    # B3 (token 7, size 3) takes A0 (token 0): (7 * 3 + 0) / 4; B0 (token 1) takes A1 (token 2): (1 + 2) / 2
    assert out[0, :, 0].tolist() == [6.0, 4.0, 1.5, 3.0, 5.0, 21 / 4]
    assert out_size[0, :, 0].tolist() == [1.0, 1.0, 2.0, 1.0, 1.0, 4.0]


def test_token_counts_follow_r_and_the_half_clamp():
    model = tiny(torch.float32, depth=4)  # 16 patches + class token
    assert token_counts(model, r=5) == [17, 12, 7, 4, 3]  # 5, then half of 11, of 6, of 3
    assert token_counts(model, r=[8, 0, 1, 5]) == [17, 9, 9, 8, 5]
    assert token_counts(model) == [17] * 5
    merge_tokens(model, 5)
    seen = []
    for block in model.blocks:  # the tokens each block's MLP sees: those left after its merge
        block.mlp.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 5)
    assert seen == token_counts(model)[1:]
    assert model.merged_sizes.sum(dim=1).flatten().tolist() == [16.0, 16.0]  # every patch counted once


def test_distillation_and_register_tokens_are_never_merged():
    for changes in ({"distilled": True}, {"reg_tokens": 2}):
        model = tiny(torch.float32, **changes)
        p = model.num_prefix_tokens
        merge_tokens(model, 8)
        x = model.embed(torch.randn(2, 3, 16, 16))
        out, size = merging_block(model.blocks[0], x, None, 8, p)
        reference = model.blocks[0](x)  # prefix tokens attend to the same tokens before the merge
        assert out.shape[1] == p + 8 and torch.equal(size[:, :p], torch.ones(2, p, 1))
        torch.testing.assert_close(out[:, :p], reference[:, :p], rtol=1e-5, atol=1e-5)
        assert model(torch.randn(2, 3, 16, 16)).shape == (2, 5)


def test_hybrid_merges_and_switches_off():
    model = create_model("r_vit_fmnist", depth=2).eval()
    x = torch.randn(2, 1, 28, 28)
    before = model(x)
    merge_tokens(model, 40)
    assert token_counts(model)[-1] < token_counts(model, r=0)[-1]
    assert model(x).shape == before.shape
    merge_tokens(model, 0)
    assert torch.equal(model(x), before)


def test_refusals_name_the_option():
    model = tiny(torch.float32)
    for bad in (-1, [1], [1, -2], 1.5, True, "3"):
        with pytest.raises(InvalidValueError, match="r ") as info:
            merge_tokens(model, bad)
        assert info.value.options == ("r",)
    with pytest.raises(VitlabError, match="token merging needs a ViT"):
        merge_tokens(create_model("bit_fmnist"), 2)
    assert type(model) is VisionTransformer


@pytest.fixture()
def image_set(tmp_path):
    """A tiny ViT checkpoint (16 patches + class token, 2 blocks) and a test folder of 6 grey 16x16 PNGs."""
    from vitlab import save

    cfg = ViTConfig(img_size=16, patch_size=4, in_chans=1, num_classes=2, embed_dim=16, depth=2, num_heads=2,
                    mlp_dim=32)
    model = randomize_(VisionTransformer(cfg), std=0.5).eval()
    ckpt = save(model, tmp_path / "tiny.safetensors", class_names=["ant", "bee"])
    rng, files = np.random.default_rng(0), []
    for i in range(6):
        folder = tmp_path / "images" / "test" / ["ant", "bee"][i % 2]
        folder.mkdir(parents=True, exist_ok=True)
        files.append(folder / f"img{i}.png")
        Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(files[-1])
    return str(ckpt), str(tmp_path / "images"), model, files


def test_eval_and_predict_take_merge_tokens(image_set, capsys):
    ckpt, root, model, files = image_set
    assert main(["eval", ckpt, "--data", root, "--device", "cpu", "--merge-tokens", "4", "--json"]) == 0
    merged = json.loads(capsys.readouterr().out)
    assert merged["token_merging"] == {"r": [4, 4], "tokens": [17, 13, 9]}
    assert main(["eval", ckpt, "--data", root, "--device", "cpu", "--merge-tokens", "8,0"]) == 0
    assert "token merging: r = 8,0 per block, tokens 17 -> 9 -> 9" in capsys.readouterr().out
    assert main(["predict", ckpt, str(files[0]), "--merge-tokens", "3", "--json", "--topk", "2"]) == 0
    top = json.loads(capsys.readouterr().out)["top"]
    from vitlab.data.images import load_sample  # the command's own preprocessing, by hand
    from vitlab.models import metadata_of

    x = metadata_of(model).preprocessing.transform()(load_sample(files[0], channels=1))[None]
    with torch.no_grad():
        expected = merge_tokens(model, 3)(x).softmax(1)[0]
    assert [t["probability"] for t in top] == pytest.approx(sorted(expected.tolist(), reverse=True), abs=1e-6)


def test_commands_refuse_bad_merge_tokens_in_one_line(image_set, tmp_path, capsys):
    ckpt, root, _, files = image_set
    for argv, message in (
        (["predict", ckpt, str(files[0]), "--merge-tokens", "-1"], "argument --merge-tokens: takes counts >= 0"),
        (["eval", ckpt, "--data", root, "--merge-tokens", "x"], "argument --merge-tokens: takes tokens to merge"),
        (["eval", ckpt, "--data", root, "--device", "cpu", "--merge-tokens", "1,2,3"],
         "--merge-tokens lists 3 counts but the model has 2 blocks"),
        (["bench", "vit_ti16", "--merge-tokens", "8", "--tasks", "inference,train"],
         "--merge-tokens times inference and latency only; drop train from --tasks"),
        (["serve", ckpt, "--merge-tokens", "2", "--backend", "onnx-int8"],
         "--merge-tokens runs on the torch backend; drop --backend onnx-int8"),
    ):
        with pytest.raises(SystemExit) if "argument" in message else contextlib.nullcontext():
            code = main(argv)
            assert code != 0
        lines = capsys.readouterr().err.strip().splitlines()  # argparse's usage lines, then the error on one line
        assert message in lines[-1] and ("argument" in message or len(lines) == 1), lines
    cnn = tmp_path / "cnn.safetensors"
    from vitlab import save

    save(create_model("bit_fmnist"), cnn)
    assert main(["predict", str(cnn), str(files[0]), "--merge-tokens", "2"]) != 0
    assert "--merge-tokens 2: token merging needs a ViT or hybrid ViT; a ResNetV2 has no tokens" in \
        capsys.readouterr().err


def test_bench_times_a_merged_copy_in_the_same_rounds():
    from vitlab.compute.bench import BenchSettings, bench_model, format_table

    settings = BenchSettings(batch_size=2, img_size=32, rounds=2, warmup=0, memory=False, timm=False, depth=3,
                             merge_tokens=2)
    [result] = bench_model("vit_ti16", ("inference",), settings, {"peak": 1e11})
    merging = result.extra["token_merging"]
    assert merging["r"] == [2, 2, 2] and merging["tokens"] == [5, 3, 2, 2]  # 4 patches + class; half-clamp
    assert merging["value"] > 0 and merging["speedup"] > 0 and set(result.extra["rounds_s"]) == {"vitlab", "merged"}
    table = format_table({"gemm_flops": {"peak": 1e11}, "results": [result.to_dict()]})
    assert "token merging r=2 (tokens 5 -> 2)" in table and "the unmerged vitlab model's speed" in table
