"""The inspection math against analytic expectations and independent (loop-based or scikit-learn) implementations."""

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vitlab
from tests.conftest import CLASS_TOKEN_VIT
from vitlab.inspect import (
    attention_rollout,
    attention_statistics,
    embedding_filters_pca,
    mean_attention_distance,
    patch_centre_distances,
    position_embedding_similarity,
    position_embedding_structure,
    rollout_matrix,
    upsample_map,
)


def random_attention(layers, batch, heads, tokens, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, tokens, tokens, generator=gen).mul(2).softmax(-1) for _ in range(layers)]


def uniform_attention(layers, batch, heads, tokens):
    return [torch.full((batch, heads, tokens, tokens), 1.0 / tokens) for _ in range(layers)]


def self_attention(layers, batch, heads, tokens):
    return [torch.eye(tokens).expand(batch, heads, tokens, tokens).clone() for _ in range(layers)]


# ----- patch-embedding filters


def test_filter_pca_matches_scikit_learn():
    from sklearn.decomposition import PCA

    weight = torch.randn(48, 3, 4, 5, dtype=torch.float64)
    weight[:, 0] *= 3.0  # give the spectrum some spread
    ours = embedding_filters_pca(weight, num_components=10)
    ref = PCA(n_components=10).fit(weight.reshape(48, -1).numpy())
    np.testing.assert_allclose(ours.explained_variance_ratio.numpy(), ref.explained_variance_ratio_, rtol=1e-5)
    ours_flat = ours.components.reshape(10, -1).double().numpy()
    signs = np.sign((ours_flat * ref.components_).sum(axis=1))
    np.testing.assert_allclose(ours_flat, ref.components_ * signs[:, None], atol=1e-5)
    np.testing.assert_allclose(ours.mean.reshape(-1).numpy(), ref.mean_, atol=1e-6)


def test_filter_pca_recovers_a_rank_two_filter_bank():
    # Filters = mean + a_i u + b_i v with orthonormal u, v: exactly two components, spanning {u, v}.
    basis, _ = torch.linalg.qr(torch.randn(16, 2, dtype=torch.float64))
    coeffs = torch.randn(30, 2, dtype=torch.float64) * torch.tensor([3.0, 1.0], dtype=torch.float64)
    coeffs -= coeffs.mean(dim=0)
    weight = (coeffs @ basis.T + 0.7).reshape(30, 1, 4, 4)
    pca = embedding_filters_pca(weight, num_components=5)
    ratio = pca.explained_variance_ratio.double()
    assert ratio[:2].sum() == pytest.approx(1.0, abs=1e-6)
    assert ratio[2:].abs().max() < 1e-6
    top = pca.components[:2].reshape(2, 16).double()
    projection = basis @ basis.T
    torch.testing.assert_close(top @ projection, top, atol=1e-5, rtol=0)  # lies in span{u, v}
    torch.testing.assert_close(pca.mean, torch.full((1, 4, 4), 0.7), atol=1e-6, rtol=0)


def test_filter_pca_of_a_model_uses_its_patch_embedding_and_fixes_signs():
    model = vitlab.create_model("vit_cifar", embed_dim=48, depth=1, num_heads=3, mlp_dim=32)
    pca = embedding_filters_pca(model)
    assert pca.components.shape == (28, 3, 4, 4)
    flat = pca.components.reshape(28, -1)
    peaks = flat.gather(1, flat.abs().argmax(dim=1, keepdim=True))
    assert (peaks > 0).all()
    torch.testing.assert_close(flat @ flat.T, torch.eye(28), atol=1e-5, rtol=0)


# ----- position-embedding similarity


def hand_built_sincos(gh, gw, dim):
    """2D sin-cos embedding written out independently of the model's: sin/cos of x and of y at geometric
    frequencies."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (np.arange(quarter) / quarter)
    rows = []
    for i, j in itertools.product(range(gh), range(gw)):
        rows.append(np.concatenate([np.sin(j * omega), np.cos(j * omega), np.sin(i * omega), np.cos(i * omega)]))
    return torch.tensor(np.stack(rows))


@pytest.mark.parametrize("grid", [(7, 7), (5, 8)])
def test_sincos_similarity_peaks_at_the_query_position(grid):
    gh, gw = grid
    sim = position_embedding_similarity(hand_built_sincos(gh, gw, 64), grid)
    assert sim.shape == (gh, gw, gh, gw)
    for i, j in itertools.product(range(gh), range(gw)):
        tile = sim[i, j]
        assert tile[i, j] == pytest.approx(1.0, abs=1e-6)
        others = tile.clone()
        others[i, j] = -2
        assert others.max() < 1.0 - 1e-3  # a strict, unique peak at the query itself
    structure = position_embedding_structure(sim)
    assert structure.neighbour_peak_rate == 1.0
    assert structure.distance_correlation < -0.7
    assert structure.row_column_effect > 0.01  # half the channels agree along a row or column


def test_model_sincos_similarity_matches_the_closed_form():
    # [sin wx, cos wx] . [sin wx', cos wx'] = cos(w (x - x')), so the cosine similarity of the 2D sin-cos embedding is
    # the mean over frequencies of cos(w dx) and cos(w dy).
    model = vitlab.create_model("vit_fmnist", pos_embed="sincos", img_size=(24, 36), depth=1)
    gh, gw = model.cfg.grid_size
    quarter = model.cfg.embed_dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    expected = torch.empty(gh, gw, gh, gw, dtype=torch.float64)
    for i, j, k, m in itertools.product(range(gh), range(gw), range(gh), range(gw)):
        expected[i, j, k, m] = (torch.cos(omega * (j - m)).sum() + torch.cos(omega * (i - k)).sum()) / (2 * quarter)
    torch.testing.assert_close(position_embedding_similarity(model).double(), expected, atol=1e-5, rtol=0)


def test_similarity_drops_the_class_slot_of_a_learned_embedding():
    model = vitlab.create_model("vit_fmnist", **CLASS_TOKEN_VIT, depth=1)
    with torch.no_grad():
        model.pos_embed[0, 0] = 100.0  # a class slot that would dominate if it were not dropped
    patches = model.pos_embed[0, 1:].detach()
    expected = F.cosine_similarity(patches[:, None], patches[None, :], dim=-1).reshape(7, 7, 7, 7)
    torch.testing.assert_close(position_embedding_similarity(model), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(position_embedding_similarity(model.pos_embed, (7, 7), num_prefix_tokens=1), expected,
                               atol=1e-5, rtol=0)


def test_similarity_of_learned_2d_embedding_uses_its_row_and_column_halves():
    model = vitlab.create_model("vit_fmnist", pos_embed="learned_2d", img_size=(20, 28), depth=1, class_token=False,
                                pool="gap")
    ys, xs = model.pos_embed_y.detach(), model.pos_embed_x.detach()
    sim = position_embedding_similarity(model)
    for (i, j), (k, m) in [((0, 0), (4, 6)), ((2, 3), (2, 5)), ((1, 6), (3, 6))]:
        a, b = torch.cat([ys[i], xs[j]]), torch.cat([ys[k], xs[m]])
        assert float(sim[i, j, k, m]) == pytest.approx(float(F.cosine_similarity(a, b, dim=0)), abs=1e-5)


def test_similarity_of_a_model_without_position_embedding_is_an_error():
    model = vitlab.create_model("vit_fmnist", pos_embed="none", depth=1)
    with pytest.raises(ValueError, match="no position embedding"):
        position_embedding_similarity(model)


def grid_similarity(gh, gw, fn):
    sim = torch.empty(gh, gw, gh, gw, dtype=torch.float64)
    for i, j, k, m in itertools.product(range(gh), range(gw), range(gh), range(gw)):
        sim[i, j, k, m] = fn(i - k, j - m)
    return sim


def test_structure_row_column_effect_separates_stripes_from_distance():
    def isotropic(dy, dx):
        d = math.hypot(dy, dx)
        return 1.0 - 0.2 * d + 0.01 * d * d

    plain = position_embedding_structure(grid_similarity(6, 7, isotropic))
    assert plain.row_column_effect == pytest.approx(0.0, abs=1e-9)
    assert plain.row_column_contrast > 0.1  # the raw contrast is confounded with distance...
    assert plain.distance_correlation < -0.99
    assert plain.neighbour_peak_rate == 1.0
    striped = position_embedding_structure(grid_similarity(6, 7, lambda dy, dx: isotropic(dy, dx) + 0.3 * (
        dy == 0 or dx == 0)))
    assert striped.row_column_effect == pytest.approx(0.3, abs=1e-9)  # ...the effect is not
    single_row = position_embedding_structure(grid_similarity(1, 5, isotropic))
    assert math.isnan(single_row.row_column_contrast) and math.isnan(single_row.row_column_effect)


# ----- mean attention distance


def brute_force_pair_mean(gh, gw, ph, pw):
    total, count = 0.0, 0
    for a, b in itertools.product(itertools.product(range(gh), range(gw)), repeat=2):
        total += math.hypot((a[0] - b[0]) * ph, (a[1] - b[1]) * pw)
        count += 1
    return total / count


def test_uniform_attention_gives_the_grid_mean_distance():
    grid, patch, prefix = (3, 5), (4, 6), 2
    tokens = prefix + 15
    maps = uniform_attention(3, 2, 4, tokens)
    expected = brute_force_pair_mean(*grid, *patch)
    dist = mean_attention_distance(maps, grid, patch, prefix)
    assert dist.shape == (3, 4)
    torch.testing.assert_close(dist, torch.full((3, 4), expected), atol=1e-4, rtol=0)
    # without renormalisation, attention to the 2 prefix tokens counts as distance 0
    raw = mean_attention_distance(maps, grid, patch, prefix, renormalize=False)
    torch.testing.assert_close(raw, torch.full((3, 4), expected * 15 / tokens), atol=1e-4, rtol=0)


def test_uniform_attention_on_two_patches_is_half_a_patch():
    dist = mean_attention_distance(uniform_attention(1, 1, 1, 3), (1, 2), (16, 16), 1)
    assert float(dist) == pytest.approx(8.0)


def test_attention_to_itself_gives_distance_zero():
    dist = mean_attention_distance(self_attention(4, 2, 3, 1 + 12), (3, 4), (8, 8), 1)
    assert torch.equal(dist, torch.zeros(4, 3))


def test_mean_distance_matches_a_loop_over_queries_and_keys():
    grid, patch, prefix = (2, 3), (5, 7), 1
    maps = random_attention(2, 3, 2, prefix + 6)
    expected = np.zeros((3, 2, 2))
    centres = [((i + 0.5) * patch[0], (j + 0.5) * patch[1]) for i, j in itertools.product(range(2), range(3))]
    for layer, b, h in itertools.product(range(2), range(3), range(2)):
        per_query = []
        for q in range(6):
            weights = maps[layer][b, h, prefix + q, prefix:].double().numpy()
            dists = [math.dist(centres[q], centres[k]) for k in range(6)]
            per_query.append(float(np.dot(weights, dists) / weights.sum()))
        expected[b, layer, h] = np.mean(per_query)
    ours = mean_attention_distance(maps, grid, patch, prefix, per_image=True)
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-5)
    np.testing.assert_allclose(mean_attention_distance(maps, grid, patch, prefix).numpy(), expected.mean(0),
                               rtol=1e-5)


def test_patch_centre_distances_are_in_pixels_for_non_square_patches():
    dist = patch_centre_distances((2, 2), (4, 10))
    assert float(dist[0, 1]) == pytest.approx(10.0)  # same row, next column
    assert float(dist[0, 2]) == pytest.approx(4.0)  # next row, same column
    assert float(dist[0, 3]) == pytest.approx(math.hypot(4, 10))


def test_distance_rejects_maps_that_do_not_fit_the_grid():
    with pytest.raises(ValueError, match="tokens"):
        mean_attention_distance(uniform_attention(1, 1, 1, 10), (3, 3), (4, 4), 0)


# ----- attention rollout


def reference_rollout(maps, prefix, fusion, discard_ratio):
    """Per image, with numpy and loops: fuse heads, zero the lowest patch-key attentions of each row, renormalise,
    mix with the identity, multiply from the first layer on."""
    batch, _, tokens, _ = maps[0].shape
    n_discard = int(discard_ratio * (tokens - prefix))
    out = []
    for b in range(batch):
        result = np.eye(tokens)
        for layer in maps:
            heads = layer[b].double().numpy()
            fused = {"mean": heads.mean(0), "max": heads.max(0), "min": heads.min(0)}[fusion]
            for row in fused:
                order = np.argsort(row[prefix:], kind="stable")
                row[prefix + order[:n_discard]] = 0.0
            fused = fused / fused.sum(axis=1, keepdims=True)
            result = (0.5 * fused + 0.5 * np.eye(tokens)) @ result
        out.append(result)
    return np.stack(out)


@pytest.mark.parametrize("fusion", ["mean", "max", "min"])
@pytest.mark.parametrize("discard_ratio", [0.0, 0.3])
def test_rollout_matches_a_per_image_reference(fusion, discard_ratio):
    maps = random_attention(3, 3, 4, 2 + 12, seed=5)  # 2 prefix tokens, 3x4 grid, a batch of 3
    full = rollout_matrix(maps, 2, fusion, discard_ratio)
    expected = reference_rollout(maps, 2, fusion, discard_ratio)
    np.testing.assert_allclose(full.numpy(), expected, atol=1e-10)
    np.testing.assert_allclose(full.sum(-1).numpy(), np.ones((3, 14)), atol=1e-12)  # rows sum to 1
    maps_class = attention_rollout(maps, 2, (3, 4), fusion, discard_ratio)
    np.testing.assert_allclose(maps_class.numpy(), expected[:, 0, 2:].reshape(3, 3, 4), atol=1e-6)
    maps_mean = attention_rollout(maps, 2, (3, 4), fusion, discard_ratio, source="mean")
    np.testing.assert_allclose(maps_mean.numpy(), expected[:, 2:, 2:].mean(1).reshape(3, 3, 4), atol=1e-6)


def test_rollout_is_computed_per_image_in_a_batch():
    maps = random_attention(2, 4, 3, 1 + 6, seed=2)
    batched = attention_rollout(maps, 1, (2, 3))
    for b in range(4):
        single = attention_rollout([m[b : b + 1] for m in maps], 1, (2, 3))
        torch.testing.assert_close(batched[b : b + 1], single)


def test_uniform_attention_gives_a_uniform_rollout():
    layers, tokens = 4, 1 + 20
    full = rollout_matrix(uniform_attention(layers, 2, 3, tokens), 1)
    # ((U + I) / 2)^L = I / 2^L + (1 - 1 / 2^L) U, since U (all 1/T) is idempotent
    expected = torch.eye(tokens, dtype=torch.float64) / 2**layers + (1 - 0.5**layers) / tokens
    torch.testing.assert_close(full, expected.expand(2, tokens, tokens), atol=1e-12, rtol=0)
    rollout_map = attention_rollout(uniform_attention(layers, 2, 3, tokens), 1, (4, 5))
    torch.testing.assert_close(rollout_map, torch.full((2, 4, 5), (1 - 0.5**layers) / tokens), atol=1e-7, rtol=0)


def test_attention_to_itself_gives_the_identity_rollout():
    full = rollout_matrix(self_attention(3, 2, 4, 1 + 9), 1, "max", 0.5)
    torch.testing.assert_close(full, torch.eye(10, dtype=torch.float64).expand(2, 10, 10), atol=0, rtol=0)
    assert torch.equal(attention_rollout(self_attention(3, 2, 4, 10), 1, (3, 3)), torch.zeros(2, 3, 3))


def test_rollout_without_prefix_tokens_needs_the_mean_source():
    maps = random_attention(2, 1, 2, 6)
    assert attention_rollout(maps, 0, (2, 3), source="mean").shape == (1, 2, 3)
    with pytest.raises(ValueError, match="class token"):
        attention_rollout(maps, 0, (2, 3))


@pytest.mark.parametrize("kwargs, message", [({"head_fusion": "median"}, "head_fusion"),
                                             ({"discard_ratio": 1.0}, "discard_ratio")])
def test_rollout_rejects_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        attention_rollout(random_attention(1, 1, 1, 5), 1, (2, 2), **kwargs)


def test_upsample_map_normalises_to_the_peak():
    maps = torch.stack([torch.full((2, 3), 0.25), torch.zeros(2, 3), torch.tensor([[0.0, 1, 0], [0, 0, 0]])])
    up = upsample_map(maps, (8, 12))
    assert up.shape == (3, 8, 12)
    torch.testing.assert_close(up[0], torch.ones(8, 12))
    assert torch.equal(up[1], torch.zeros(8, 12))
    peak_row, peak_col = divmod(int(up[2].argmax()), 12)
    assert peak_row < 4 and 4 <= peak_col < 8  # the peak stays inside the patch it came from


# ----- through a model


def test_model_with_uniform_attention_gives_the_analytic_statistics():
    # Zero query and key projections make every attention logit 0, so each layer attends uniformly.
    model = vitlab.create_model("vit_fmnist", **CLASS_TOKEN_VIT, img_size=(20, 28), depth=3, num_classes=10)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight[: 2 * model.cfg.embed_dim] = 0
            block.attn.qkv.bias[: 2 * model.cfg.embed_dim] = 0
    stats = attention_statistics(model, torch.randn(5, 1, 20, 28), rollout_images=3, batch_size=2)
    expected = brute_force_pair_mean(5, 7, 4, 4)
    torch.testing.assert_close(stats.mean_distance, torch.full((3, 4), expected), atol=1e-4, rtol=0)
    tokens = 1 + 35
    torch.testing.assert_close(stats.rollout, torch.full((3, 5, 7), (1 - 0.5**3) / tokens), atol=1e-6, rtol=0)
    assert stats.logits.shape == (3, 10)


def test_statistics_leave_the_normal_forward_on_the_fused_kernel(monkeypatch):
    model = vitlab.create_model("vit_fmnist", depth=2).train()
    x = torch.randn(3, 1, 28, 28)
    stats = attention_statistics(model, x, rollout_images=3)
    assert model.training  # mode restored
    calls = []
    fused = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or fused(*a, **k))
    logits = model.eval()(x)
    assert len(calls) == 2  # one fused call per layer
    torch.testing.assert_close(logits, stats.logits, atol=1e-5, rtol=1e-5)


def test_statistics_of_a_pooled_model_without_class_token():
    model = vitlab.create_model("vit_fmnist", depth=2, class_token=False, pool="gap")
    x = torch.randn(4, 1, 28, 28)
    stats = attention_statistics(model, x, rollout_images=2)
    _, maps = model.forward_with_attention(x[:2])
    torch.testing.assert_close(stats.rollout, attention_rollout(maps, 0, (7, 7), source="mean"))
