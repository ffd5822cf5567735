"""File formats, on top of the engine (``lohakit.core``):

* :mod:`.peft`: PEFT's adapter directories (``adapter_config.json`` + ``adapter_model.safetensors``);
  also the engine's adapter store behind ``LoHaModel.save_pretrained`` / ``from_pretrained``.
* :mod:`.kohya`: kohya / LyCORIS single ``.safetensors`` files (``lora_unet_...hada_w1_a``).
* :mod:`.families`: per-model-family key-name tables those files use.
"""
