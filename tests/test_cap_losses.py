"""CAP (SCALEKD.md steps 1–5) and the loss terms, against hand computations in numpy / plain arithmetic."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from scalekd.cap import CrossAttentionProjector, default_num_heads
from scalekd.distiller import LOSS_TERMS
from scalekd.losses import dual_view_loss, feature_loss, kd_loss, task_loss

# --------------------------------------------------------------------------- numpy references


def np_softmax(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def np_log_softmax(x, axis=-1):
    m = x.max(axis=axis, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=axis, keepdims=True))


def np_layer_norm(x, gamma, beta, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * gamma + beta


def np_feature_loss(a, b):
    """L(a, b) of SCALEKD.md: L2-normalise over channels per token, Σ squared differences / batch."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    an = a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-12)
    bn = b / np.maximum(np.linalg.norm(b, axis=-1, keepdims=True), 1e-12)
    return ((an - bn) ** 2).sum() / a.shape[0]


def np_phi(tokens):
    tokens = np.asarray(tokens, dtype=np.float64)
    return tokens - tokens.mean(axis=1, keepdims=True)


def np_cap(cap: CrossAttentionProjector, x: np.ndarray, queries: np.ndarray | None) -> np.ndarray:
    """Steps 1–5 of SCALEKD.md's CAP with explicit loops / matrix products, eval-mode norms."""
    P = {k: v.detach().double().numpy() for k, v in cap.state_dict().items()}
    b, cs, h, w = x.shape
    # 1. Conv3×3, stride 1, pad 1, Cs→Cs; then the norm; then ReLU
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    W, bias = P["patchify.0.weight"], P["patchify.0.bias"]
    conv = np.zeros((b, cs, h, w))
    for o in range(cs):
        for i in range(h):
            for j in range(w):
                conv[:, o, i, j] = bias[o] + (W[o][None] * xp[:, :, i : i + 3, j : j + 3]).sum(axis=(1, 2, 3))
    if "patchify.1.running_mean" in P:  # BatchNorm2d, eval: running statistics
        rm, rv = P["patchify.1.running_mean"], P["patchify.1.running_var"]
        normed = (conv - rm[:, None, None]) / np.sqrt(rv[:, None, None] + 1e-5)
        normed = normed * P["patchify.1.weight"][:, None, None] + P["patchify.1.bias"][:, None, None]
    else:  # LayerNorm2d: over the channels at every position
        normed = np_layer_norm(conv.transpose(0, 2, 3, 1), P["patchify.1.weight"], P["patchify.1.bias"]).transpose(0, 3, 1, 2)
    # 2. + positional embedding, after the conv
    feat = np.maximum(normed, 0) + P["pos_embed"]
    tokens = feat.reshape(b, cs, h * w).transpose(0, 2, 1)  # (B, HW, Cs), token = i·W + j
    # 3. queries → 1×1 conv (a per-token linear map) + ReLU
    if queries is None:
        queries = np.repeat(P["queries"], b, axis=0)
    qin = np.maximum(queries @ P["query_proj.weight"].T + P["query_proj.bias"], 0)
    # 4. one multi-head cross attention, global, no residual
    ct = P["q.weight"].shape[0]
    q = qin @ P["q.weight"].T + P["q.bias"]
    kv = tokens @ P["kv.weight"].T + P["kv.bias"]
    k, v = kv[..., :ct], kv[..., ct:]
    heads = cap.num_heads
    d = ct // heads
    out_heads = []
    for hd in range(heads):
        sl = slice(hd * d, (hd + 1) * d)
        logits = q[..., sl] @ k[..., sl].transpose(0, 2, 1) * d**-0.5 * cap.softmax_scale
        out_heads.append(np_softmax(logits, axis=-1) @ v[..., sl])
    attn = np.concatenate(out_heads, axis=-1)
    y = attn @ P["out.weight"].T + P["out.bias"]
    # 5. LayerNorm, FFN Ct→4Ct→Ct with ReLU, LN output added back
    y = np_layer_norm(y, P["norm.weight"], P["norm.bias"])
    hidden = np.maximum(y @ P["ffn.0.weight"].T + P["ffn.0.bias"], 0)
    return y + hidden @ P["ffn.2.weight"].T + P["ffn.2.bias"]


def _randomise(cap: CrossAttentionProjector) -> CrossAttentionProjector:
    """Every weight, bias and norm statistic set to non-trivial values (so no step is an identity)."""
    with torch.no_grad():
        for name, p in cap.named_parameters():
            p.copy_(torch.randn_like(p) * (0.6 if "weight" in name else 0.3))
        for name, buf in cap.named_buffers():
            if name.endswith("running_mean"):
                buf.copy_(torch.randn_like(buf) * 0.2)
            elif name.endswith("running_var"):
                buf.copy_(torch.rand_like(buf) + 0.5)
    return cap.double().eval()


# --------------------------------------------------------------------------- CAP


def test_cap_trainable_queries_output_shape_and_repeat_over_batch():
    cap = CrossAttentionProjector(8, (4, 5), 16, (2, 3), num_heads=4, softmax_scale=5.0).eval()
    assert cap.queries.shape == (1, 6, 16)
    x = torch.randn(1, 8, 4, 5)
    y = cap(x.expand(3, -1, -1, -1))
    assert y.shape == (3, 6, 16)
    # the same query embedding is used for every sample: identical inputs give identical outputs
    torch.testing.assert_close(y[0], y[2])
    torch.testing.assert_close(y[:1], cap(x))


def test_cap_call_time_queries_output_shape_and_per_sample_queries():
    cap = CrossAttentionProjector(8, (4, 4), 16, (3, 3), num_heads=2, trainable_queries=False).eval()
    assert cap.queries is None
    x = torch.randn(1, 8, 4, 4).expand(2, -1, -1, -1)
    queries = torch.randn(2, 9, 16)
    y = cap(x, queries=queries)
    assert y.shape == (2, 9, 16)
    # each sample's output depends on its own queries: different queries, different outputs
    assert not torch.allclose(y[0], y[1])
    torch.testing.assert_close(y[1:], cap(x[:1], queries=queries[1:]))


def test_cap_trainable_query_init_is_standard_normal_and_pos_embed_std_002():
    cap = CrossAttentionProjector(64, (14, 14), 256, (14, 14), num_heads=4)
    assert cap.queries.shape == (1, 196, 256)
    assert abs(cap.queries.std().item() - 1.0) < 0.02 and abs(cap.queries.mean().item()) < 0.02
    assert cap.pos_embed.shape == (1, 64, 14, 14)
    assert abs(cap.pos_embed.std().item() - 0.02) < 0.002


@pytest.mark.parametrize(
    "heads, scale, norm, trainable",
    [(1, 1.0, "bn", False), (2, 5.0, "bn", True), (4, 0.2, "ln", False), (2, 1.0, "ln", True)],
)
def test_cap_equals_hand_computation_of_steps_1_to_5(heads, scale, norm, trainable):
    cap = _randomise(CrossAttentionProjector(3, (2, 3), 4, (1, 2), heads, scale, trainable, norm))
    assert (cap.num_heads, cap.softmax_scale) == (heads, scale)
    x = np.random.default_rng(5).normal(size=(2, 3, 2, 3))
    queries = None if trainable else np.random.default_rng(6).normal(size=(2, 2, 4))
    expected = np_cap(cap, x, queries)
    got = cap(torch.from_numpy(x), queries=None if queries is None else torch.from_numpy(queries))
    assert got.shape == (2, 2, 4)
    np.testing.assert_allclose(got.detach().numpy(), expected, rtol=1e-10, atol=1e-10)


def test_cap_number_of_heads_changes_the_output():
    torch.manual_seed(1)
    one = _randomise(CrossAttentionProjector(3, (2, 3), 4, (1, 2), 1, 1.0, False))
    four = CrossAttentionProjector(3, (2, 3), 4, (1, 2), 4, 1.0, False).double().eval()
    four.load_state_dict(one.state_dict())  # same weights, only the head split differs
    x = torch.randn(2, 3, 2, 3, dtype=torch.float64)
    q = torch.randn(2, 2, 4, dtype=torch.float64)
    y1, y4 = one(x, queries=q), four(x, queries=q)
    assert (y1 - y4).abs().max().item() > 1e-3
    np.testing.assert_allclose(y4.detach().numpy(), np_cap(four, x.numpy(), q.numpy()), rtol=1e-10, atol=1e-10)


def test_cap_softmax_scale_multiplies_the_attention_logits():
    # logits = q·kᵀ·d^-0.5·s are linear in q: scale s == scale 1 with the q projection multiplied by s
    base = _randomise(CrossAttentionProjector(3, (2, 3), 8, (2, 2), 2, 5.0, False))
    ref = CrossAttentionProjector(3, (2, 3), 8, (2, 2), 2, 1.0, False).double().eval()
    ref.load_state_dict(base.state_dict())
    with torch.no_grad():
        ref.q.weight.mul_(5.0)
        ref.q.bias.mul_(5.0)
    x = torch.randn(2, 3, 2, 3, dtype=torch.float64)
    q = torch.randn(2, 4, 8, dtype=torch.float64)
    torch.testing.assert_close(base(x, queries=q), ref(x, queries=q), rtol=1e-10, atol=1e-10)
    unscaled = CrossAttentionProjector(3, (2, 3), 8, (2, 2), 2, 1.0, False).double().eval()
    unscaled.load_state_dict(base.state_dict())
    assert (unscaled(x, queries=q) - base(x, queries=q)).abs().max().item() > 1e-3


def test_cap_softmax_scale_zero_gives_uniform_attention_so_all_tokens_equal():
    cap = _randomise(CrossAttentionProjector(3, (2, 3), 4, (2, 2), 2, 0.0, False))
    y = cap(torch.randn(2, 3, 2, 3, dtype=torch.float64), queries=torch.randn(2, 4, 4, dtype=torch.float64))
    # uniform attention: every query gets the mean of v, so every output token is the same
    torch.testing.assert_close(y, y[:, :1].expand_as(y), rtol=0, atol=1e-12)
    assert (y[0, 0] - y[1, 0]).abs().max().item() > 1e-6  # yet the two samples differ


def test_default_num_heads_picks_head_size_closest_to_target():
    assert default_num_heads(768, 48) == 16  # Swin-L stage 3 (SCALEKD.md: 16 heads)
    assert default_num_heads(1536, 64) == 24  # Swin-L stage 4 (SCALEKD.md: 24 heads)
    assert default_num_heads(1024, 64) == 16
    assert default_num_heads(192) == 3


# --------------------------------------------------------------------------- loss terms by hand

# B=2, N=2, C=2, written out; the norms are round numbers (3-4-5 triangles)
A = [[[3.0, 4.0], [1.0, 0.0]], [[0.0, 2.0], [-1.0, 1.0]]]
B = [[[4.0, 3.0], [0.0, 1.0]], [[1.0, 0.0], [1.0, 1.0]]]


def test_feature_loss_on_hand_example():
    # normalised A: (.6,.8),(1,0) | (0,1),(-1,1)/√2   normalised B: (.8,.6),(0,1) | (1,0),(1,1)/√2
    # squared differences per token: 0.08, 2 | 2, 2 → sum 6.08 → / batch 2 = 3.04
    got = feature_loss(torch.tensor(A), torch.tensor(B))
    assert got.item() == pytest.approx(3.04, abs=1e-6)
    assert np_feature_loss(A, B) == pytest.approx(3.04, abs=1e-12)


def test_feature_loss_is_zero_for_same_direction_and_ignores_token_scale():
    a = torch.tensor(A)
    assert feature_loss(a, a * torch.tensor([[[2.0], [0.5]], [[3.0], [7.0]]])).item() == pytest.approx(0.0, abs=1e-7)
    # opposite directions at every token: |u - (-u)|² = 4 per token, 4 tokens / batch 2 = 8
    assert feature_loss(a, -a).item() == pytest.approx(8.0, abs=1e-5)


def test_dual_view_loss_on_hand_example():
    # φ subtracts each channel's mean over the tokens:
    # φ(A) = (1,2),(-1,-2) | (.5,.5),(-.5,-.5)     φ(B) = (2,1),(-2,-1) | (0,-.5),(0,.5)
    phi_b = [[[2.0, 1.0], [-2.0, -1.0]], [[0.0, -0.5], [0.0, 0.5]]]
    # L(φ(A), φ(B)): sample 0: 0.4 + 0.4; sample 1: 2 × (0.5 + (1 + 1/√2)²) = 2 × (2 + √2); / 2
    l_dc = (0.8 + 2 * (2 + math.sqrt(2))) / 2
    assert l_dc == pytest.approx(2.4 + math.sqrt(2))
    np.testing.assert_allclose(np_phi(B), phi_b)
    alpha, beta = 0.08, 0.06
    direct, dc = dual_view_loss(torch.tensor(A), torch.tensor(A), torch.tensor(B),
                                torch.tensor(phi_b), alpha, beta)
    assert direct.item() == pytest.approx(alpha * 3.04, rel=1e-6)
    assert dc.item() == pytest.approx(beta * l_dc, rel=1e-6)


def test_dual_view_loss_uses_the_dc_view_for_phi_and_the_direct_view_for_l():
    rng = np.random.default_rng(7)
    direct, dc_view, final = (rng.normal(size=(2, 6, 5)) for _ in range(3))
    t = lambda a: torch.from_numpy(a)  # noqa: E731
    got_direct, got_dc = dual_view_loss(t(direct), t(dc_view), t(final), t(np_phi(final)), 0.016, 0.008)
    assert got_direct.item() == pytest.approx(0.016 * np_feature_loss(direct, final), rel=1e-6)
    assert got_dc.item() == pytest.approx(0.008 * np_feature_loss(np_phi(dc_view), np_phi(final)), rel=1e-6)


def _np_kd(s, t, T):
    p_t = np_softmax(np.asarray(t) / T)
    return 0.5 * T * T * -(p_t * np_log_softmax(np.asarray(s) / T)).sum(-1).mean()


@pytest.mark.parametrize("T", [1.0, 2.0, 4.0])
def test_kd_loss_is_half_t_squared_soft_cross_entropy(T):
    s = [[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]
    t = [[3.0, 2.0, 1.0], [0.0, math.log(2.0), 0.0]]
    expected = _np_kd(s, t, T)
    # the uniform student of sample 2 costs exactly ln 3 whatever the teacher
    p0 = np_softmax(np.array(t[0]) / T)
    by_hand = 0.5 * T * T * ((-(p0 * np_log_softmax(np.array(s[0]) / T)).sum() + math.log(3.0)) / 2)
    assert expected == pytest.approx(by_hand, rel=1e-12)
    assert kd_loss(torch.tensor(s), torch.tensor(t), T).item() == pytest.approx(expected, rel=1e-6)


def test_kd_loss_at_t1_on_fully_written_example():
    # student uniform over 2 classes, teacher (ln 3, 0) → p_t = (3/4, 1/4); CE = ln 2; × 0.5
    got = kd_loss(torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3.0), 0.0]]))
    assert got.item() == pytest.approx(0.5 * math.log(2.0), rel=1e-6)


LOGITS = [[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]]
LABELS = [0, 2]


def test_task_loss_ce_on_hand_example():
    lp = np_log_softmax(np.array(LOGITS))
    expected = -(lp[0, 0] + lp[1, 2]) / 2
    got = task_loss("ce", torch.tensor(LOGITS), torch.tensor(LABELS))
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_task_loss_ce_smooth_uses_label_smoothing_01():
    lp = np_log_softmax(np.array(LOGITS))
    eps, k = 0.1, 3
    per_sample = [-(1 - eps) * lp[i, y] - eps / k * lp[i].sum() for i, y in enumerate(LABELS)]
    got = task_loss("ce_smooth", torch.tensor(LOGITS), torch.tensor(LABELS))
    assert got.item() == pytest.approx(np.mean(per_sample), rel=1e-6)
    assert got.item() != pytest.approx(task_loss("ce", torch.tensor(LOGITS), torch.tensor(LABELS)).item(), rel=1e-3)


def test_task_loss_bce_is_binary_cross_entropy_on_one_hot_summed_over_classes_per_sample():
    z = np.array(LOGITS)
    y = np.zeros_like(z)
    y[0, 0] = y[1, 2] = 1.0
    sig = 1 / (1 + np.exp(-z))
    # the release's reduction: summed over classes, divided by the batch (not timm's default mean over both)
    expected = -(y * np.log(sig) + (1 - y) * np.log(1 - sig)).sum() / z.shape[0]
    got = task_loss("bce", torch.tensor(LOGITS), torch.tensor(LABELS))
    assert got.item() == pytest.approx(expected, rel=1e-6)


# --------------------------------------------------------------------------- the distiller's total


def test_distiller_loss_is_sum_of_terms_and_path_terms_recompute_from_paths(make_distiller):
    from scalekd.targets import OnlineTargets

    distiller, split = make_distiller()
    # train(): the student's and CAPs' BatchNorms use batch statistics, which are the same in forward()
    # and paths(); it also keeps the student's features (hence the attention) away from the near-uniform
    # regime of untrained running statistics, where φ of an almost token-constant output is float32 noise.
    distiller.train()
    cfg = distiller.config
    images = torch.randn(2, 3, 160, 160)
    targets = OnlineTargets(split)(torch.randn(2, 3, 64, 64))
    labels = torch.tensor([3, 7])
    with torch.no_grad():
        terms = distiller(images, targets, labels)
        paths, logits = distiller.paths(images)
    assert set(terms) == set(LOSS_TERMS) | {"loss", "logits"}
    assert terms["loss"].item() == pytest.approx(sum(terms[k].item() for k in LOSS_TERMS), rel=1e-6)
    assert all(math.isfinite(terms[k].item()) and terms[k].item() > 0 for k in LOSS_TERMS)

    final = targets.final.double().numpy()
    for path in ("proxy", "main"):
        assert paths[f"{path}_direct"].shape == (2, 16, 192)
        direct = paths[f"{path}_direct"].double().numpy()
        dc_view = paths[f"{path}_dc"].double().numpy()
        assert terms[f"{path}_direct"].item() == pytest.approx(cfg.alpha * np_feature_loss(direct, final), rel=1e-5)
        assert terms[f"{path}_dc"].item() == pytest.approx(cfg.beta * np_feature_loss(np_phi(dc_view), np_phi(final)), rel=1e-5)

    lg = logits.double().numpy()
    lp = np_log_softmax(lg)
    ce = -(lp[0, 3] + lp[1, 7]) / 2
    smooth = np.mean([-(0.9) * lp[i, y] - 0.1 / 10 * lp[i].sum() for i, y in enumerate([3, 7])])
    expected_task = {"ce": ce, "ce_smooth": smooth}[cfg.task_loss]
    assert terms["task"].item() == pytest.approx(0.5 * expected_task, rel=1e-5)
    assert terms["kd"].item() == pytest.approx(_np_kd(lg, targets.logits.double().numpy(), 1.0), rel=1e-5)
    torch.testing.assert_close(terms["logits"], logits)


def test_distiller_wiring_proxy_through_late_and_main_queries_from_proxy(make_distiller):
    distiller, split = make_distiller()
    distiller.eval()
    images = torch.randn(1, 3, 160, 160)
    with torch.no_grad():
        paths, logits = distiller.paths(images)
        s3, s4, _ = distiller.student(images)
        torch.testing.assert_close(logits, distiller.student.model(images))
        for view in ("direct", "dc"):
            proxy = split.late(distiller.caps[f"s3_{view}"](s3))
            torch.testing.assert_close(paths[f"proxy_{view}"], proxy)
            torch.testing.assert_close(paths[f"main_{view}"], distiller.caps[f"s4_{view}"](s4, queries=proxy))
    # the two views have separate CAPs, so their outputs differ
    assert (paths["proxy_direct"] - paths["proxy_dc"]).abs().max().item() > 1e-4
    assert distiller.caps["s3_direct"].queries is not None and distiller.caps["s4_direct"].queries is None


def test_distiller_applies_task_and_kd_weights_and_temperature(make_distiller):
    from scalekd.targets import OnlineTargets

    base, split = make_distiller()
    images = torch.randn(2, 3, 160, 160)
    targets = OnlineTargets(split)(torch.randn(2, 3, 64, 64))
    labels = torch.tensor([1, 2])
    weighted, _ = make_distiller(task_weight=2.0, kd_weight=3.0, temperature=2.0, task_loss="bce", alpha=1.0, beta=0.5)
    base.eval(), weighted.eval()
    with torch.no_grad():
        t0 = base(images, targets, labels)
        t1 = weighted(images, targets, labels)
    torch.testing.assert_close(t0["logits"], t1["logits"])  # same seed, same student
    lg = t1["logits"].double().numpy()
    z = 1 / (1 + np.exp(-lg))
    y = np.zeros_like(lg)
    y[0, 1] = y[1, 2] = 1
    bce = -(y * np.log(z) + (1 - y) * np.log(1 - z)).sum() / lg.shape[0]
    assert t1["task"].item() == pytest.approx(2.0 * bce, rel=1e-5)
    assert t1["kd"].item() == pytest.approx(3.0 * _np_kd(lg, targets.logits.double().numpy(), 2.0), rel=1e-5)
    for path in ("proxy", "main"):
        assert t1[f"{path}_direct"].item() == pytest.approx(t0[f"{path}_direct"].item() / base.config.alpha, rel=1e-5)
        assert t1[f"{path}_dc"].item() == pytest.approx(0.5 * t0[f"{path}_dc"].item() / base.config.beta, rel=1e-5)


def test_baselines_without_features_run_no_cap_and_weigh_only_task_and_kd(make_distiller):
    import torch

    from scalekd.targets import Targets

    distiller, split = make_distiller()
    x = torch.randn(2, *distiller.student.input_size)
    labels = torch.tensor([1, 2])
    with torch.no_grad():
        t = split.targets(torch.randn(2, *split.info.input_size))
    targets = Targets.from_final(t["final"], t["logits"])
    full = distiller(x, targets, labels)
    distiller.config.features = False
    kd_only = distiller(x, targets, labels)
    assert kd_only["proxy_direct"] == 0 and kd_only["main_dc"] == 0
    assert kd_only["loss"].item() == pytest.approx(full["task"].item() + full["kd"].item(), rel=1e-6)
    distiller.config.kd_weight = 0.0
    alone = distiller(x, targets, labels)
    assert alone["loss"].item() == pytest.approx(full["task"].item(), rel=1e-6)
    alone["loss"].backward()
    assert all(p.grad is None for p in distiller.caps.parameters())
