"""qcompiler.eval's metrics against a float64 numpy reference: perplexity, KL per token."""

from __future__ import annotations

import numpy as np

from qcompiler.eval import LogitsOf, evaluate_windows, kl_per_token, kl_rows, perplexity


def _logp(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_metrics_match_float64() -> None:
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 300, size=(3, 17))
    ref = (4 * rng.standard_normal((3, 17, 300))).astype(np.float32)
    q = (ref + 0.3 * rng.standard_normal(ref.shape)).astype(np.float32)
    lp, lq = _logp(ref), _logp(q)
    nll = -np.take_along_axis(lq[:, :-1], ids[:, 1:, None], -1)
    assert abs(perplexity(q, ids) / np.exp(nll.mean()) - 1) < 1e-5
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    np.testing.assert_allclose(kl_rows(ref, q), kl.ravel(), rtol=1e-4, atol=1e-7)
    assert abs(kl_per_token(ref, q) / kl.mean() - 1) < 1e-5
    # evaluate_windows on the same logits: the same numbers
    by_window = {w.tobytes(): (a, b) for w, a, b in zip(ids, q, ref)}
    res = evaluate_windows(LogitsOf(lambda w: by_window[w.tobytes()][0]), ids,
                           LogitsOf(lambda w: by_window[w.tobytes()][1]), progress=False)
    assert abs(res.perplexity / perplexity(q, ids) - 1) < 1e-9
    assert abs(res.kl / kl.mean() - 1) < 1e-5
    top1 = (ref.argmax(-1) == q.argmax(-1)).mean()
    assert res.top1_agreement == top1
