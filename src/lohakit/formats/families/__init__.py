"""Per-model-family key-name tables: how a family's files name modules, mapped onto the
diffusers/transformers module tree. One module per family group:

* :mod:`.stable_diffusion`: SD 1.x/2.x and SDXL (the SGM UNet names).
"""
