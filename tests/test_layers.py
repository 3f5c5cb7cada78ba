"""Layer semantics against small numpy transcriptions of Darknet's C loops (flat CHW buffers).

The oracle models cover the common layers; these cover the corners no upstream model exercises
(weighted shortcuts, channel mismatches, maxpool_depth, local, negative upsample stride, ...)."""
import numpy as np
import pytest
import torch

from darknet_cfg import build_model, parse_cfg_text

rng = np.random.default_rng(0)


def model_from(text):
    return build_model(parse_cfg_text(text, "t.cfg")).eval()


def net(c, h, w):
    return f"[net]\nwidth={w}\nheight={h}\nchannels={c}\n"


def run_all(model, x):
    with torch.no_grad():
        return [o[0].numpy() for o in model.forward_all(torch.from_numpy(x)[None])]


# ------------------------------------------------------------------------------- shortcut
def darknet_shortcut(out_prev, adds, weights, n_norm, eval_mode):
    """shortcut_multilayer_cpu (+ the fused normalisation darknet applies at load time)."""
    size = out_prev.size
    src = out_prev.reshape(-1)
    n = len(adds)
    nweights = 0 if weights is None else weights.size
    layer_step = nweights // (n + 1) if nweights else 0
    step = size // layer_step if nweights else 0
    w = None if weights is None else weights.reshape(-1).astype(np.float32).copy()
    if w is not None and n_norm != "none":
        for chan in range(layer_step):
            idx = [chan + i * layer_step for i in range(n + 1)]
            if n_norm == "relu":
                floor = 0.001 if eval_mode else 0.0
                vals = np.maximum(w[idx], floor)
                w[idx] = vals / (0.0001 + vals.sum())
            else:
                e = np.exp(w[idx] - w[idx].max())
                w[idx] = e / (0.0001 + e.sum())
    out = np.zeros(size, np.float32)
    for i in range(size):
        out[i] = src[i] * (w[i // step] if w is not None else 1)
        for k, a in enumerate(adds):
            a = a.reshape(-1)
            if i < a.size:
                out[i] += a[i] * (w[i // step + (k + 1) * layer_step] if w is not None else 1)
    return out.reshape(out_prev.shape)


@pytest.mark.parametrize("wt,wn", [("none", "none"), ("per_feature", "none"),
                                   ("per_channel", "relu"), ("per_channel", "softmax"),
                                   ("per_feature", "relu")])
def test_shortcut_weighted_and_mismatched_channels(wt, wn):
    text = net(3, 5, 4) + (
        "[convolutional]\nfilters=6\nsize=1\nactivation=linear\n"     # 0: 6 channels
        "[convolutional]\nfilters=4\nsize=1\nactivation=linear\n"     # 1: 4 channels
        "[convolutional]\nfilters=8\nsize=1\nactivation=linear\n"     # 2: 8 channels
        "[convolutional]\nfilters=6\nsize=1\nactivation=linear\n"     # 3: 6 channels (prev)
        f"[shortcut]\nfrom=1,2\nactivation=leaky\nweights_type={wt}\n"
        f"weights_normalization={wn}\n")
    model = model_from(text)
    sc = model.layers[4]
    if sc.weight is not None:
        with torch.no_grad():
            sc.weight.copy_(torch.from_numpy(rng.uniform(-1, 2, sc.weight.shape).astype(np.float32)))
    x = rng.standard_normal((3, 5, 4)).astype(np.float32)
    outs = run_all(model, x)
    w = None if sc.weight is None else sc.weight.detach().numpy()
    ref = darknet_shortcut(outs[3], [outs[1], outs[2]], w, wn, eval_mode=True)
    ref = np.where(ref > 0, ref, 0.1 * ref)
    np.testing.assert_allclose(outs[4], ref, rtol=1e-5, atol=1e-6)
    if wn == "relu":  # training forward uses max(w, 0), not darknet's fused max(w, 0.001)
        model.train()
        with torch.no_grad():
            y = model.layers[4](*[torch.from_numpy(outs[j])[None] for j in (3, 1, 2)])[0].numpy()
        ref = darknet_shortcut(outs[3], [outs[1], outs[2]], w, wn, eval_mode=False)
        np.testing.assert_allclose(y, np.where(ref > 0, ref, 0.1 * ref), rtol=1e-5, atol=1e-6)


# -------------------------------------------------------------------------------- maxpool
def darknet_maxpool(x, size, sx, sy, pad, out_h, out_w):
    c, h, w = x.shape
    out = np.full((c, out_h, out_w), -np.inf, np.float32)
    for k in range(c):
        for i in range(out_h):
            for j in range(out_w):
                for n in range(size):
                    for m in range(size):
                        r, cc = i * sy - pad // 2 + n, j * sx - pad // 2 + m
                        if 0 <= r < h and 0 <= cc < w:
                            out[k, i, j] = max(out[k, i, j], x[k, r, cc])
    return out


@pytest.mark.parametrize("opts", ["size=2\nstride=1", "size=2\nstride=2", "size=3\nstride=2",
                                  "size=3\nstride=2\npadding=0", "size=5\nstride=1",
                                  "size=3\nstride_x=2\nstride_y=1", "size=4\nstride=3\npadding=1"])
def test_maxpool_geometry(opts):
    model = model_from(net(2, 7, 9) + "[maxpool]\n" + opts + "\n")
    spec = model.specs[0]
    x = rng.standard_normal((2, 7, 9)).astype(np.float32)
    y = run_all(model, x)[0]
    o = spec.out_shape
    ref = darknet_maxpool(x, spec.size, spec.stride_x, spec.stride_y, spec.padding, o.h, o.w)
    np.testing.assert_array_equal(y, ref)


def test_maxpool_depth():
    model = model_from(net(7, 3, 3) + "[maxpool]\nmaxpool_depth=1\nout_channels=3\n")
    x = rng.standard_normal((7, 3, 3)).astype(np.float32)
    y = run_all(model, x)[0]
    ref = np.stack([x[g::3].max(0) for g in range(3)])
    np.testing.assert_array_equal(y, ref)


def test_local_avgpool_counts_only_inside_taps():
    model = model_from(net(2, 5, 5) + "[local_avgpool]\nsize=3\nstride=2\n")
    x = rng.standard_normal((2, 5, 5)).astype(np.float32)
    y = run_all(model, x)[0]
    pad = 2
    for k in range(2):
        for i in range(y.shape[1]):
            for j in range(y.shape[2]):
                r0, c0 = i * 2 - pad // 2, j * 2 - pad // 2
                win = x[k, max(r0, 0):r0 + 3, max(c0, 0):c0 + 3]
                assert y[k, i, j] == pytest.approx(win.mean(), rel=1e-5)


# ---------------------------------------------------------------------------------- local
def test_local_layer_matches_darknet_im2col_gemm():
    model = model_from(net(3, 5, 4) + "[local]\nfilters=2\nsize=3\nstride=2\npad=1\n"
                                      "activation=linear\n")
    layer = model.layers[0]
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(rng.standard_normal(layer.weight.shape).astype("f4")))
        layer.bias.copy_(torch.from_numpy(rng.standard_normal(layer.bias.shape).astype("f4")))
    x = rng.standard_normal((3, 5, 4)).astype(np.float32)
    y = run_all(model, x)[0]
    # darknet: im2col (rows c*ky*kx, columns = output positions), then per position j
    # output[f, j] = bias[f, j] + sum_k weights[j][f][k] * col[k, j]
    n, size, stride, pad = 2, 3, 2, 1
    out_h, out_w = y.shape[1:]
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad)))
    col = np.zeros((3 * size * size, out_h * out_w), np.float32)
    for c in range(3):
        for ky in range(size):
            for kx in range(size):
                row = (c * size + ky) * size + kx
                for i in range(out_h):
                    for j in range(out_w):
                        col[row, i * out_w + j] = xp[c, i * stride + ky, j * stride + kx]
    flat_w = layer.weight.detach().numpy().reshape(-1)  # darknet's buffer order
    flat_b = layer.bias.detach().numpy().reshape(-1)
    K = 3 * size * size
    ref = np.zeros((n, out_h * out_w), np.float32)
    for j in range(out_h * out_w):
        a = flat_w[j * K * n:(j + 1) * K * n].reshape(n, K)
        ref[:, j] = a @ col[:, j]
    ref += flat_b.reshape(n, -1)
    np.testing.assert_allclose(y.reshape(n, -1), ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------- upsample / reorg
def test_upsample_scale_and_negative_stride():
    model = model_from(net(2, 4, 6) + "[upsample]\nstride=2\nscale=0.5\n"
                                      "[upsample]\nstride=-2\nscale=3\n")
    x = rng.standard_normal((2, 4, 6)).astype(np.float32)
    up, down = run_all(model, x)
    np.testing.assert_array_equal(up, 0.5 * x.repeat(2, 1).repeat(2, 2))
    ref = 3 * up.reshape(2, 4, 2, 6, 2).sum((2, 4))  # darknet sums scale*x over each block
    np.testing.assert_allclose(down, ref, rtol=1e-6)


@pytest.mark.parametrize("section", ["reorg3d", "reorg"])
def test_reorg_reverse_inverts(section):
    model = model_from(net(8, 4, 6) + f"[{section}]\nstride=2\n[{section}]\nstride=2\nreverse=1\n")
    x = rng.standard_normal((8, 4, 6)).astype(np.float32)
    fwd, back = run_all(model, x)
    assert fwd.shape == (32, 2, 3)
    if section == "reorg3d":
        np.testing.assert_array_equal(back, x)


def test_reorg_old_matches_darknet_loop():
    model = model_from(net(8, 4, 6) + "[reorg]\nstride=2\n")
    x = rng.standard_normal((8, 4, 6)).astype(np.float32)
    y = run_all(model, x)[0]
    C, H, W, s = 8, 4, 6, 2
    inp, out = x.reshape(-1), np.zeros(x.size, np.float32)
    for k in range(C):
        for j in range(H):
            for i in range(W):
                c2, off = k % (C // (s * s)), k // (C // (s * s))
                w2, h2 = i * s + off % s, j * s + off // s
                out[(k * H + j) * W + i] = inp[(c2 * H * s + h2) * W * s + w2]
    np.testing.assert_array_equal(y.reshape(-1), out)


# ---------------------------------------------------------------------- route and others
def test_route_groups_apply_to_each_input():
    text = net(3, 4, 4) + ("[convolutional]\nfilters=4\nsize=1\nactivation=linear\n"
                           "[convolutional]\nfilters=6\nsize=1\nactivation=linear\n"
                           "[route]\nlayers=0,1\ngroups=2\ngroup_id=1\n")
    model = model_from(text)
    assert model.specs[2].out_shape.c == 5
    x = rng.standard_normal((3, 4, 4)).astype(np.float32)
    a, b, r = run_all(model, x)
    np.testing.assert_array_equal(r, np.concatenate([a[2:], b[3:]]))


def test_crop_centre_and_adjust():
    model = model_from(net(3, 8, 8) + "[crop]\ncrop_height=4\ncrop_width=6\n")
    x = rng.random((3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(run_all(model, x)[0], x[:, 2:6, 1:7] * 2 - 1)


def test_scale_channels_and_sam():
    text = net(4, 3, 3) + ("[convolutional]\nfilters=4\nsize=1\nactivation=linear\n"
                           "[avgpool]\n"
                           "[scale_channels]\nfrom=-2\n"
                           "[sam]\nfrom=-3\n")
    model = model_from(text)
    x = rng.standard_normal((4, 3, 3)).astype(np.float32)
    c, g, s, m = run_all(model, x)
    np.testing.assert_allclose(s, c * g, rtol=1e-6)
    np.testing.assert_allclose(m, s * c, rtol=1e-6)


def test_yolo_forward_and_new_coords():
    text = net(3, 2, 2) + ("[convolutional]\nfilters=14\nsize=1\nactivation=linear\n"
                           "[yolo]\nmask=0,1\nclasses=2\nnum=3\nanchors=1,2,3,4,5,6,7,8\n"
                           "scale_x_y=1.2\n")
    model = model_from(text)
    assert model.specs[1].anchors == (1, 2, 3, 4) and model.specs[1].all_anchors == (1, 2, 3, 4, 5, 6)
    x = rng.standard_normal((3, 2, 2)).astype(np.float32)
    raw, y = run_all(model, x)
    sig = 1 / (1 + np.exp(-raw))
    for a in range(2):
        b = a * 7
        np.testing.assert_allclose(y[b:b + 2], sig[b:b + 2] * 1.2 - 0.1, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(y[b + 2:b + 4], raw[b + 2:b + 4])
        np.testing.assert_allclose(y[b + 4:b + 7], sig[b + 4:b + 7], rtol=1e-5)
    model = model_from(text.replace("scale_x_y=1.2", "scale_x_y=2\nnew_coords=1"))
    raw, y = run_all(model, x)
    np.testing.assert_allclose(y[[0, 1, 7, 8]], raw[[0, 1, 7, 8]] * 2 - 0.5, rtol=1e-6)
    np.testing.assert_array_equal(y[[2, 3, 4, 5, 6]], raw[[2, 3, 4, 5, 6]])


def test_activations_match_darknet_formulas():
    from darknet_cfg.layers.activations import ACTIVATIONS
    x = torch.linspace(-30, 30, 601)
    xs = x.numpy().astype(np.float64)
    refs = {
        "leaky": np.where(xs > 0, xs, 0.1 * xs),
        "relu6": np.clip(xs, 0, 6),
        "ramp": xs * (xs > 0) + 0.1 * xs,
        "mish": xs * np.tanh(np.where(xs > 20, xs, np.log1p(np.exp(xs)))),
        "hard_mish": np.where(xs > 0, xs, np.where(xs > -2, xs * xs / 2 + xs, 0)),
        "swish": xs / (1 + np.exp(-xs)),
        "logistic": 1 / (1 + np.exp(-xs)),
        "selu": np.where(xs >= 0, 1.0507 * xs, 1.0507 * 1.6732 * (np.exp(xs) - 1)),
        "gelu": 0.5 * xs * (1 + np.tanh(0.797885 * xs + 0.035677 * xs ** 3)),
        "plse": np.where(xs < -4, .01 * (xs + 4), np.where(xs > 4, .01 * (xs - 4) + 1, .125 * xs + .5)),
        "lhtan": np.where(xs < 0, .001 * xs, np.where(xs > 1, .001 * (xs - 1) + 1, xs)),
        "elu": np.where(xs >= 0, xs, np.exp(xs) - 1),
        "loggy": 2 / (1 + np.exp(-xs)) - 1,
    }
    for name, ref in refs.items():
        np.testing.assert_allclose(ACTIVATIONS[name](x).numpy(), ref, rtol=2e-6, atol=2e-6,
                                   err_msg=name)
    # per-pixel channel normalisations
    t = torch.randn(2, 5, 3, 3)
    n = ACTIVATIONS["normalize_channels"](t)
    pos = t.clamp(min=0)
    torch.testing.assert_close(n, pos / (0.0001 + pos.sum(1, keepdim=True)))


def test_maxpool_native_padding_equals_explicit_padding():
    """MaxPool uses torch's own padding/ceil_mode where that gives darknet's windows; every
    geometry must equal padding with -FLT_MAX explicitly (darknet's rule)."""
    import itertools

    import torch.nn.functional as F

    from darknet_cfg.layers.pooling import NEG, MaxPool
    torch.manual_seed(0)
    native = 0
    for size, stride, pad, h, w in itertools.product((1, 2, 3, 5, 9, 13), (1, 2, 3),
                                                      (0, 1, 2, 4, 8, 12), (5, 8, 13, 16), (5, 7, 16)):
        lo = pad // 2
        if (w + pad - size) // stride + 1 <= 0 or (h + pad - size) // stride + 1 <= 0 or size > w + pad:
            continue
        if size > h + pad:
            continue
        m = MaxPool(size, stride, stride, pad)
        x = torch.randn(2, 3, h, w)
        ref = F.max_pool2d(F.pad(x, (lo, pad - lo, lo, pad - lo), value=NEG), size, stride)
        native += any(m.pads) and m._native_padding(h, w) is not None
        got = m(x)
        assert got.shape == ref.shape and torch.equal(got, ref), (size, stride, pad, h, w)
    assert native > 300
