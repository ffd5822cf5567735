"""Integrations with other libraries, on top of the engine and the file formats:

* :mod:`.diffusers`: LoHa files straight into diffusers pipelines (``load_loha_weights``, ...).
* :mod:`.lora`: the exact (rank r²) and compressed LoRA export, for LoRA-only runtimes.

``lohakit.diffusers`` and ``lohakit.lora`` are the public paths of these modules.
"""
