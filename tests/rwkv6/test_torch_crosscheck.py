"""Cross-check RWKV-6.0 against an independent PyTorch autograd model and against the official ``rwkv`` package.

1. ``torch_forward`` below is RWKV-6.0 written from the spec (docs/rwkv6.md; BlinkDL/RWKV-LM
   ``RWKV_Tmix_x060`` / ``RWKV_CMix_x060``) as plain loops and einsums in float64: the ddlerp token shift through the
   shared tanh LoRA (targets w, k, v, r, g in that order), the per-token decay LoRA, the WKV as the per-token
   recurrence on the (H, N, N) [key, value] state with w_t decaying S_{t-1} at token t's write, torch's own
   ``group_norm``. Autograd differentiates it; nothing of minirwkv is reused. Logits and every gradient of the mean
   cross-entropy must equal minirwkv's in float64.
2. The ``rwkv`` pip package (BlinkDL's inference code, CPU, fp32, no JIT, no CUDA) loads the same parameters from a
   ``.pth`` and runs them in sequence mode and token by token; its logits and RNN state must equal minirwkv's in
   float32. Its GroupNorm eps is hard-coded 64e-5 on y, minirwkv's default ``ln_x_eps``.
(Skipped without torch; part 2 also without the ``rwkv`` package.)
"""
import dataclasses
import os

import numpy as np
import pytest

import minirwkv
from minirwkv import ModelConfig
from minirwkv.testing import assert_close
from helpers import random_params, random_tokens

torch = pytest.importorskip("torch")
F = torch.nn.functional

CONFIG = ModelConfig(vocab_size=13, n_embd=8, n_layer=2, dim_ffn=20, version="6", head_size=4, d_mix_lora=3,
                     d_decay_lora=5)  # H = 2, N = 4; LoRA ranks neither equal nor the official 32 / 64


# ---------------------------------------------------------------------------------------------------------------
# An independent RWKV-6.0 in PyTorch
# ---------------------------------------------------------------------------------------------------------------

TARGETS = ("w", "k", "v", "r", "g")  # the ddlerp's five targets, in the order of time_maa_w1's column blocks


def torch_wkv6(r, k, v, w, u):
    """y_t = S_{t-1}^T r_t + <r_t, u*k_t> v_t,  S_t = diag(w_t) S_{t-1} + k_t v_t^T; r, k, v, w (B, T, H, N), u (H, N).
    S[b, h, i, j]: i = key channel, j = value channel, S_{-1} = 0."""
    B, T, H, N = r.shape
    S = torch.zeros(B, H, N, N, dtype=r.dtype)
    ys = []
    for t in range(T):
        kv = torch.einsum("bhi,bhj->bhij", k[:, t], v[:, t])
        ys.append(torch.einsum("bhi,bhij->bhj", r[:, t], S + u[None, :, :, None] * kv))
        S = w[:, t, :, :, None] * S + kv
    return torch.stack(ys, 1)  # (B, T, H, N)


def torch_forward(P, idx, n_layer, ln_x_eps=64e-5):
    """Logits (B, T, V) of the official-name state dict P (torch tensors) for token ids idx (B, T)."""
    C = P["emb.weight"].shape[1]
    H, N = P["blocks.0.att.time_faaaa"].shape

    def ln(x, n):
        return F.layer_norm(x, (C,), P[n + ".weight"], P[n + ".bias"], eps=1e-5)

    def shift(z):  # z'_t = z_{t-1}, z'_0 = 0
        return torch.cat([torch.zeros_like(z[:, :1]), z[:, :-1]], dim=1)

    def lin(x, name):
        return x @ P[name].T

    x = ln(P["emb.weight"][idx], "blocks.0.ln0")
    B, T, _ = x.shape
    for i in range(n_layer):
        b = f"blocks.{i}."
        a = b + "att."
        z = ln(x, b + "ln1")
        delta = shift(z) - z  # time_maa weights the PREVIOUS token
        xi = z + delta * P[a + "time_maa_x"]
        w1, w2 = P[a + "time_maa_w1"], P[a + "time_maa_w2"]  # (C, 5 D), (5, D, C)
        D = w2.shape[1]
        h = torch.tanh(xi @ w1)  # (B, T, 5 D)
        xs = {}
        for f, q in enumerate(TARGETS):
            m = h[..., f * D:(f + 1) * D] @ w2[f]  # (B, T, C)
            xs[q] = z + delta * (P[a + "time_maa_" + q] + m)
        r = lin(xs["r"], a + "receptance.weight").view(B, T, H, N)
        k = lin(xs["k"], a + "key.weight").view(B, T, H, N)
        v = lin(xs["v"], a + "value.weight").view(B, T, H, N)
        g = F.silu(lin(xs["g"], a + "gate.weight"))
        w_hat = P[a + "time_decay"] + torch.tanh(xs["w"] @ P[a + "time_decay_w1"]) @ P[a + "time_decay_w2"]
        w = torch.exp(-torch.exp(w_hat)).view(B, T, H, N)
        y = torch_wkv6(r, k, v, w, P[a + "time_faaaa"]).reshape(B * T, C)
        o = F.group_norm(y, H, P[a + "ln_x.weight"], P[a + "ln_x.bias"], eps=ln_x_eps).view(B, T, C)
        x = x + lin(o * g, a + "output.weight")

        z = ln(x, b + "ln2")
        delta = shift(z) - z
        xk = z + delta * P[b + "ffn.time_maa_k"]
        xr = z + delta * P[b + "ffn.time_maa_r"]
        kk = torch.square(torch.relu(lin(xk, b + "ffn.key.weight")))
        x = x + torch.sigmoid(lin(xr, b + "ffn.receptance.weight")) * lin(kk, b + "ffn.value.weight")
    return lin(ln(x, "ln_out"), "head.weight")


def torch_loss_and_grads(params, idx, targets, n_layer, ln_x_eps=64e-5):
    P = {k: torch.tensor(np.asarray(v, dtype=np.float64), requires_grad=True) for k, v in params.items()}
    logits = torch_forward(P, torch.tensor(idx), n_layer, ln_x_eps)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), torch.tensor(targets).reshape(-1))
    loss.backward()
    return logits.detach().numpy(), loss.item(), {k: p.grad.numpy() for k, p in P.items()}


def test_logits_loss_and_every_gradient_match_pytorch_float64():
    params = random_params(CONFIG, seed=11, dtype=np.float64)
    idx, targets = random_tokens(CONFIG, 2, 9, seed=1), random_tokens(CONFIG, 2, 9, seed=2)
    logits_t, loss_t, grads_t = torch_loss_and_grads(params, idx, targets, CONFIG.n_layer)
    logits = minirwkv.forward(params, idx, impl="numpy")
    loss, grads = minirwkv.loss_and_grads(params, idx, targets, impl="numpy")
    assert_close(logits, logits_t, np.float64, what="logits")
    assert abs(loss - loss_t) <= 1e-12 * abs(loss_t)
    assert set(grads) == set(grads_t)
    for k in params:
        assert np.abs(grads_t[k]).max() > 0, f"{k}: zero reference gradient, the check would be empty"
        assert_close(grads[k], grads_t[k], np.float64, what=k)


@pytest.mark.parametrize("impl", ["parallel", "numba"])
def test_other_engines_match_pytorch_float64(impl):
    params = random_params(CONFIG, seed=12, dtype=np.float64)
    idx, targets = random_tokens(CONFIG, 2, 9, seed=3), random_tokens(CONFIG, 2, 9, seed=4)
    logits_t, _, grads_t = torch_loss_and_grads(params, idx, targets, CONFIG.n_layer)
    assert_close(minirwkv.forward(params, idx, impl=impl), logits_t, np.float64, what=f"{impl} logits")
    _, grads = minirwkv.loss_and_grads(params, idx, targets, impl=impl)
    for k in params:
        assert_close(grads[k], grads_t[k], np.float64, what=f"{impl} {k}")


def test_groupnorm_eps_override_matches_pytorch_at_that_eps():
    """config=ModelConfig(..., ln_x_eps=1e-5): minirwkv's logits and gradients are the torch model's at eps 1e-5,
    and differ from those at the default 64e-5 (small ln_x inputs make the eps visible)."""
    params = random_params(CONFIG, seed=13, dtype=np.float64)
    for i in range(CONFIG.n_layer):  # shrink the WKV output so that eps matters against its variance
        params[f"blocks.{i}.att.value.weight"] = params[f"blocks.{i}.att.value.weight"] * 0.05
    idx, targets = random_tokens(CONFIG, 2, 9, seed=5), random_tokens(CONFIG, 2, 9, seed=6)
    cfg = dataclasses.replace(CONFIG, ln_x_eps=1e-5)
    logits_t, _, grads_t = torch_loss_and_grads(params, idx, targets, CONFIG.n_layer, ln_x_eps=1e-5)
    logits_default_t, _, _ = torch_loss_and_grads(params, idx, targets, CONFIG.n_layer, ln_x_eps=64e-5)
    logits = minirwkv.forward(params, idx, impl="numpy", config=cfg)
    assert_close(logits, logits_t, np.float64, what="logits at ln_x_eps=1e-5")
    _, grads = minirwkv.loss_and_grads(params, idx, targets, impl="numpy", config=cfg)
    for k in params:
        assert_close(grads[k], grads_t[k], np.float64, what=f"{k} at ln_x_eps=1e-5")
    default = minirwkv.forward(params, idx, impl="numpy")
    assert_close(default, logits_default_t, np.float64, what="logits at the default ln_x_eps")
    assert np.abs(logits - default).max() > 1e-3 * np.abs(default).max(), "the eps override changed nothing"


# ---------------------------------------------------------------------------------------------------------------
# The official rwkv pip package
# ---------------------------------------------------------------------------------------------------------------

# The package's pure-PyTorch path has no head-size or T limit (its CUDA kernels would); N = 8 keeps H = 4 > 1.
PIP_CONFIG = ModelConfig(vocab_size=19, n_embd=32, n_layer=2, dim_ffn=64, version="6", head_size=8, d_mix_lora=4,
                         d_decay_lora=6)


def pip_rwkv():
    """The rwkv package's RWKV class, imported without TorchScript and CUDA (environment read at import)."""
    os.environ.setdefault("RWKV_JIT_ON", "0")
    os.environ.setdefault("RWKV_CUDA_ON", "0")
    os.environ.setdefault("RWKV_V7_ON", "0")  # "1" would replace RWKV with the RWKV-7-only class
    model = pytest.importorskip("rwkv.model", reason="the official `rwkv` pip package is not installed")
    if os.environ.get("RWKV_V7_ON") == "1":
        pytest.skip("RWKV_V7_ON=1 in the environment: rwkv.model.RWKV is then the RWKV-7-only class")
    return model.RWKV


def pip_model(params, tmp_path):
    path = tmp_path / "model.pth"
    torch.save({k: torch.tensor(np.asarray(v, dtype=np.float32)) for k, v in params.items()}, path)
    model = pip_rwkv()(model=str(path), strategy="cpu fp32", verbose=False)
    assert model.version == 6.0, f"the rwkv package detected v{model.version}, not 6.0"
    return model


def test_rwkv_package_sequence_and_rnn_logits_and_state_match(tmp_path):
    params = random_params(PIP_CONFIG, seed=21, dtype=np.float32, scale=0.3)
    model = pip_model(params, tmp_path)
    tokens = random_tokens(PIP_CONFIG, 1, 12, seed=7)[0]
    ours = minirwkv.forward(params, tokens[None], impl="numpy")[0]  # (T, V)

    with torch.no_grad():
        theirs, _ = model.forward([int(t) for t in tokens], None, full_output=True)
        last, pstate = model.forward([int(t) for t in tokens], None)
    assert_close(ours, theirs.numpy(), np.float32, kind="vs_f64_model", what="sequence-mode logits")
    assert_close(ours[-1], last.numpy(), np.float32, kind="vs_f64_model", what="sequence-mode last logits")
    assert np.abs(ours[-1]).max() > 1e-2, "near-zero logits make the comparison empty"

    _, ostate = minirwkv.prefill(params, tokens[None], impl="numpy")
    for i, s in enumerate(ostate.layers):  # pip: state[3i] att_x, [3i+1] S (H, N, N) [key, value], [3i+2] ffn_x
        assert_close(s.att_x[0], pstate[3 * i].numpy(), np.float32, kind="vs_f64_model", what=f"{i} att_x")
        assert_close(s.wkv[0], pstate[3 * i + 1].numpy(), np.float32, kind="vs_f64_model", what=f"{i} wkv")
        assert_close(s.ffn_x[0], pstate[3 * i + 2].numpy(), np.float32, kind="vs_f64_model", what=f"{i} ffn_x")

    state, pstate = minirwkv.init_state(params, 1), None
    for t, tok in enumerate(tokens):
        logits, state = minirwkv.rnn_step(params, np.array([tok]), state)
        with torch.no_grad():
            plog, pstate = model.forward([int(tok)], pstate)
        assert_close(logits[0], plog.numpy(), np.float32, kind="vs_f64_model", what=f"RNN logits at step {t}")
        assert_close(logits[0], ours[t], np.float32, kind="vs_f64_model", what=f"RNN vs parallel at step {t}")
