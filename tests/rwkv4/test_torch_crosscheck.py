"""Cross-check against an independent RWKV-4 written in PyTorch with autograd (skipped without torch).

The PyTorch model below follows BlinkDL/RWKV-LM ``RWKV-v4neo/src/model.py`` (nn.ZeroPad2d time shift, LayerNorm,
the WKV as an explicit sum over the past); autograd differentiates it. Nothing of minirwkv is reused.
"""
import numpy as np
import pytest

import minirwkv
from minirwkv import ModelConfig
from minirwkv.testing import assert_close
from helpers import random_params, random_tokens

torch = pytest.importorskip("torch")
F = torch.nn.functional


def torch_wkv(w, u, k, v):
    """y_t = (sum_{i<t} e^{(t-1-i)w + k_i} v_i + e^{u+k_t} v_t) / (same without v), via logsumexp per t."""
    B, T, C = k.shape
    ys = []
    for t in range(T):
        i = torch.arange(t, dtype=k.dtype)
        past = (t - 1 - i)[None, :, None] * w + k[:, :t]  # (B, t, C)
        logits = torch.cat([past, (u + k[:, t])[:, None]], dim=1)  # (B, t+1, C)
        ys.append((torch.softmax(logits, dim=1) * v[:, : t + 1]).sum(1))
    return torch.stack(ys, 1)


def torch_forward(P, idx, n_layer):
    ln = lambda x, n: F.layer_norm(x, (x.shape[-1],), P[n + ".weight"], P[n + ".bias"], eps=1e-5)  # noqa: E731
    shift = torch.nn.ZeroPad2d((0, 0, 1, -1))
    x = ln(P["emb.weight"][idx], "blocks.0.ln0")
    for i in range(n_layer):
        b = f"blocks.{i}."
        z = ln(x, b + "ln1")
        xx = shift(z)
        mix = lambda m: z * P[b + m] + xx * (1 - P[b + m])  # noqa: E731
        k = mix("att.time_mix_k") @ P[b + "att.key.weight"].T
        v = mix("att.time_mix_v") @ P[b + "att.value.weight"].T
        r = mix("att.time_mix_r") @ P[b + "att.receptance.weight"].T
        y = torch_wkv(-torch.exp(P[b + "att.time_decay"]), P[b + "att.time_first"], k, v)
        x = x + (torch.sigmoid(r) * y) @ P[b + "att.output.weight"].T
        z = ln(x, b + "ln2")
        xx = shift(z)
        mix = lambda m: z * P[b + m] + xx * (1 - P[b + m])  # noqa: E731
        k = torch.square(torch.relu(mix("ffn.time_mix_k") @ P[b + "ffn.key.weight"].T))
        x = x + torch.sigmoid(mix("ffn.time_mix_r") @ P[b + "ffn.receptance.weight"].T) * (k @ P[b + "ffn.value.weight"].T)
    return ln(x, "ln_out") @ P["head.weight"].T


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_logits_loss_and_grads_match_pytorch(dtype):
    config = ModelConfig(vocab_size=13, n_embd=8, n_layer=2, dim_ffn=20)
    params = random_params(config, seed=11, dtype=dtype)
    idx, targets = random_tokens(config, 2, 9, seed=1), random_tokens(config, 2, 9, seed=2)
    P = {k: torch.tensor(v.astype(np.float64), requires_grad=True) for k, v in params.items()}
    logits_t = torch_forward(P, torch.tensor(idx), config.n_layer)
    loss_t = F.cross_entropy(logits_t.reshape(-1, config.vocab_size), torch.tensor(targets).reshape(-1))
    loss_t.backward()
    logits = minirwkv.forward(params, idx, impl="numpy")
    loss, grads = minirwkv.loss_and_grads(params, idx, targets, impl="numpy")
    kind = "same" if dtype == np.float64 else "vs_f64_model"
    assert_close(logits, logits_t.detach().numpy(), dtype, kind=kind, what="logits")
    assert abs(loss - loss_t.item()) <= 1e-10 + (1e-5 if dtype == np.float32 else 0) * abs(loss_t.item())
    for k in params:
        assert_close(grads[k], P[k].grad.numpy(), dtype, kind=kind, what=k)
