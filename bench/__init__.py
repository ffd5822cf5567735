"""lohakit benchmark suite: ``python -m bench {linear,llama,conv,infer,memory,calibrate,all,render} [--quick]``.

Every suite builds the variants side by side in ONE process (memory: one subprocess per
variant), interleaves their repetitions and reports medians and RATIOS against the
frozen-base floor (the frozen model plus a single trainable scalar, so that backward still
runs through every layer). Variants:

* ``floor``             frozen base + one trainable scalar
* ``peft_lora``         PEFT LoRA at the same rank
* ``peft_loha``         PEFT LoHa
* ``lycoris_loha``      LyCORIS LoHa, default mode (rebuilds ΔW, then runs W + ΔW)
* ``lycoris_bypass``    LyCORIS LoHa with ``bypass_mode=True`` (base(x) + ΔW·x)
* ``lohakit``           lohakit, ``compute_path="auto"`` (cost model)
* ``lohakit_factored``  lohakit forced onto the factored chain
* ``lohakit_mweight``   lohakit forced onto the merged-weight training node (base layer on W + ΔW)
* ``lohakit_mat``       lohakit forced onto the materialised ΔW

Benchmarks are not tests: nothing here asserts a timing.
"""
