"""The engine: everything LoHa needs on a live model, and nothing about files or tools.

* :mod:`.config`: :class:`LoHaConfig` (PEFT's fields).
* :mod:`.functional`: the math, pure functions on tensors (ΔW, Khatri-Rao products, the conv
  chain, the custom autograd nodes, the cost model, the per-call dispatch).
* :mod:`.kernels`: optional Triton kernels for the factored linear path.
* :mod:`.layers`: the ``nn.Module`` wrappers that hold the factors and call the math.
* :mod:`.targets`: which modules a config adapts, and with which rank and alpha.
* :mod:`.model`: :class:`LoHaModel`: injection and the adapters' lifecycle.
* :mod:`.io`: safe raw tensor files (no unpickling, atomic writes) and ``LoHaFormatError``.

Nothing here imports from ``lohakit.formats``, ``lohakit.integrations`` or ``lohakit.app``.
"""
