"""``python -m bench.merged_keep``: the merged-weight node as shipped (W + ΔW and A1B1, A2B2
rebuilt in backward) against a variant keeping them from the forward: time of one fwd+bwd of a
2752×1024 linear at 512 tokens (interleaved medians, 1 thread) and what each holds across the
step beyond x, W and the factors. Not a suite of ``python -m bench``: it answers one design
question (README "Speed", bench/NOTES.md "Kept or rebuilt").
"""
import random
import statistics
import time

import torch

from lohakit.core.functional import autograd as A
from lohakit.core.functional.conv import Stage
torch.set_num_threads(1)

class Keep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, w1a, w1b, w2a, w2b, s):
        w_eff, products = A._merged_weight(weight, [(w1a, w1b, w2a, w2b, s)], x.dtype)
        ctx.s = s
        ctx.save_for_backward(x, w_eff, w1a, w1b, w2a, w2b, *products[0])
        return x @ w_eff.T
    @staticmethod
    def backward(ctx, g):
        x, w_eff, w1a, w1b, w2a, w2b, m1s, m2 = ctx.saved_tensors
        s = ctx.s
        g2 = g.reshape(-1, g.shape[-1]); x2 = x.reshape(-1, x.shape[-1])
        dx = (g2 @ w_eff).view(x.shape)
        d = g2.T @ x2
        g1 = d * m2; gg2 = d * m1s
        return dx, None, (g1 @ w1b.T) * s, (w1a * s).T @ g1, gg2 @ w2b.T, w2a.T @ gg2, None

out_f, in_f, N = 2752, 1024, 512
for r in (8, 32):
    W = torch.randn(out_f, in_f) / 32
    fs = [torch.randn(out_f, r).requires_grad_(), torch.randn(r, in_f).requires_grad_(),
          torch.randn(out_f, r).requires_grad_(), torch.randn(r, in_f).requires_grad_()]
    x = torch.randn(N, in_f, requires_grad=True); g = torch.randn(N, out_f)
    def rebuild():
        A.MergedWeightFused.apply(x, W, None, Stage(), 1, *fs, 0.5).backward(g)
    def keep():
        Keep.apply(x, W, *fs, 0.5).backward(g)
    fns = {"rebuild": rebuild, "keep": keep}
    times = {k: [] for k in fns}
    for k in fns: fns[k]()
    rng = random.Random(0)
    for _ in range(15):
        for k in rng.sample(list(fns), 2):
            t0 = time.perf_counter(); fns[k](); times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    # memory held between forward and backward (saved tensors), per layer
    saved = {}
    for k, fwd in (("rebuild", lambda: A.MergedWeightFused.apply(x, W, None, Stage(), 1, *fs, 0.5)),
                   ("keep", lambda: Keep.apply(x, W, *fs, 0.5))):
        y = fwd()
        tensors = []
        def pack(t): tensors.append(t); return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = fwd()
        own = sum(t.numel() * t.element_size() for t in tensors if t.data_ptr() not in {p.data_ptr() for p in (x, W, *fs)})
        saved[k] = own / 2**20
    print(f"r={r}: rebuild {med['rebuild']:.1f} ms, keep {med['keep']:.1f} ms ({med['keep']/med['rebuild']:.2f}x); "
          f"held across the step beyond x, W, factors: rebuild {saved['rebuild']:.1f} MiB, keep {saved['keep']:.1f} MiB "
          f"(the layer's weight: {W.numel()*4/2**20:.1f} MiB)")
