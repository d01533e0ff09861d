"""Learned rounding of one weight (AutoRound's parametrisation), differentiable in torch.

For ``W[K, N]`` (``Y = X·W``) in groups of ``g`` rows per column, with the group's range
``m = min(min W_g, 0)``, ``M = max(max W_g, 0)`` and learned ``α, β ∈ [c, 1]`` per group
(range shrink, ``c`` = ``min_clip``) and ``V ∈ [−½, ½]`` per weight (rounding offset)::

    asym:  s = (α·M − β·m) / (2^b − 1),   z = ⌊−β·m / s⌉,   q = clamp(⌊W/s + V⌉ + z, 0, 2^b − 1),   Ŵ = s·(q − z)
    sym:   s = max(α·|M|, β·|m|) / (2^(b−1) − 1),             q = clamp(⌊W/s + V⌉, −2^(b−1), 2^(b−1) − 1), Ŵ = s·q

``⌊·⌉`` is round-half-even with a straight-through gradient (``d⌊x⌉/dx := 1``), so ``∂Ŵ/∂V``,
``∂Ŵ/∂α`` and ``∂Ŵ/∂β`` exist.  At ``α = β = 1, V = 0`` this is exactly round-to-nearest with
the exact group range (:func:`qcompiler.quant.numerics.quantize_rtn`), and whatever α, β, V
end at, :meth:`LearnedRounding.quantized` is an ordinary group-wise weight (q, s, z) in the
format every other method writes.  A short last group (K not a multiple of g) takes its range
from its own rows.

**Starting point.**  The rounded quantity may be another weight ``W̃`` than the one whose
range makes the grid: ``q = clamp(⌊W̃/s + V⌉ + z)`` with ``s, z`` from ``W``'s group ranges.
With ``W̃`` = the rows GPTQ rounded (each after the error feedback of the rows before it,
:func:`qcompiler.quant.gptq.gptq_with_start`), ``V = 0, α = β = 1`` is exactly GPTQ's solution
and the offsets are learned around it (``round{init=gptq}``).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import torch

from qcompiler.quant.numerics import QuantizedWeight, group_size_for
from qcompiler.spec import QuantSpec


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round half to even, with the identity as its gradient (straight-through)."""
    return x + (torch.round(x) - x).detach()


class LearnedRounding:
    """Parameters ``V, α, β`` of one weight and its fake-quantized value ``Ŵ(V, α, β)`` (module docstring)."""

    def __init__(self, w: np.ndarray, spec: QuantSpec, min_clip: float = 0.5,
                 start: np.ndarray | None = None) -> None:
        self.spec = spec
        self.min_clip = float(min_clip)
        w_range = torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32))
        self.w = w_range if start is None else torch.from_numpy(np.ascontiguousarray(start, dtype=np.float32))
        if self.w.shape != w_range.shape:
            raise ValueError(f"start has shape {tuple(self.w.shape)}, the weight {tuple(w_range.shape)}")
        k, n = self.w.shape
        self.group = group_size_for(spec, k)
        groups = -(-k // self.group)
        pad = groups * self.group - k
        wp = torch.cat([w_range, w_range[-1:].expand(pad, n)]) if pad else w_range
        wg = wp.reshape(groups, self.group, n)
        self.wmin = wg.amin(1).clamp(max=0.0)
        self.wmax = wg.amax(1).clamp(min=0.0)
        self.v = torch.zeros(k, n, requires_grad=True)
        self.alpha = torch.ones(groups, n, requires_grad=True)  # shrinks the max
        self.beta = torch.ones(groups, n, requires_grad=True)  # shrinks the min
        if spec.symmetric:
            self.lo, self.hi = -(2 ** (spec.bits - 1)), 2 ** (spec.bits - 1) - 1
        else:
            self.lo, self.hi = spec.qmin, spec.qmax

    @property
    def params(self) -> list[torch.Tensor]:
        return [self.v, self.alpha, self.beta]

    def _rows(self, t: torch.Tensor) -> torch.Tensor:
        return t.repeat_interleave(self.group, dim=0)[: self.w.shape[0]]

    def _grid(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Scale and zero point per group ``[G, N]`` (zero point None when symmetric)."""
        mx, mn = self.wmax * self.alpha, self.wmin * self.beta
        if self.spec.symmetric:
            if self.spec.full_range:  # signed scale: the larger extreme at -2^(b-1)
                scale = torch.where(mn.abs() >= mx.abs(), mn, mx) / float(self.lo)
            else:
                scale = torch.maximum(mx.abs(), mn.abs()) / float(self.spec.qmax)
            return self._stored(torch.where(scale == 0, torch.ones_like(scale), scale)), None
        scale = (mx - mn) / float(self.spec.qmax - self.spec.qmin)
        scale = self._stored(torch.where(scale == 0, torch.ones_like(scale), scale))
        zp = torch.clamp(round_ste(-mn / scale), self.spec.qmin, self.spec.qmax)
        return scale, zp

    def _stored(self, scale: torch.Tensor) -> torch.Tensor:
        """``scale`` rounded to the type the graph stores it in (``spec.scale_dtype``), as
        :func:`qcompiler.quant.numerics.store_scales` does for RTN: the codes are chosen for the
        stored scale.  The casts pass the gradient through unchanged."""
        half = {"fp16": (torch.float16, np.float16), "bf16": (torch.bfloat16, ml_dtypes.bfloat16)}.get(
            self.spec.scale_dtype)
        if half is None:
            return scale
        stored = scale.to(half[0]).to(torch.float32)
        tiny = float(ml_dtypes.finfo(half[1]).smallest_subnormal)
        return torch.where((stored == 0) & (scale != 0), torch.sign(scale) * tiny, stored)

    def _q(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        scale, zp = self._grid()
        s = self._rows(scale)
        if zp is None:
            return torch.clamp(round_ste(self.w / s + self.v), self.lo, self.hi), s, None
        z = self._rows(zp)
        return torch.clamp(round_ste(self.w / s + self.v) + z, self.lo, self.hi), s, z

    def fake(self) -> torch.Tensor:
        """``Ŵ`` as a differentiable function of ``V, α, β``."""
        q, s, z = self._q()
        return (q if z is None else q - z) * s

    @torch.no_grad()
    def step(self, lr: float, learn_range: bool = True) -> None:
        """One signed-gradient step on every parameter (on ``V`` alone without ``learn_range``), then
        projection onto its box."""
        for p in self.params:
            if p.grad is not None:
                if learn_range or p is self.v:
                    p -= lr * torch.sign(p.grad)
                p.grad = None
        self.v.clamp_(-0.5, 0.5)
        self.alpha.clamp_(self.min_clip, 1.0)
        self.beta.clamp_(self.min_clip, 1.0)

    @torch.no_grad()
    def reset(self) -> None:
        """Back to the starting point (``V = 0, α = β = 1``: round to nearest of ``W̃``)."""
        self.v.zero_()
        self.alpha.fill_(1.0)
        self.beta.fill_(1.0)

    @torch.no_grad()
    def quantized(self) -> QuantizedWeight:
        """The current ``(q, s, z)`` as a :class:`QuantizedWeight` (``dequantize()`` equals :meth:`fake`)."""
        q, _, _ = self._q()
        scale, zp = self._grid()
        sym = self.spec.symmetric
        return QuantizedWeight(q.numpy().astype(np.int8 if sym else np.uint8), scale.numpy().astype(np.float32),
                               None if zp is None else zp.numpy().astype(np.uint8), self.spec, self.group)
