"""The application behind the ``lohakit`` command: it imports the library, never the reverse.

* :mod:`.cli`: argument parsing and the subcommands' exit codes.
* :mod:`.train`: the training loop (``lohakit train``), on accelerate.
* :mod:`.textdata`: reading and batching text data sets.
* :mod:`.demo`: ``lohakit demo``, the main job.
* :mod:`.inspection`: ``lohakit inspect``.
* :mod:`.convert`: ``lohakit convert`` between PEFT, kohya and LoRA files.
* :mod:`.merge`: ``lohakit merge`` (a merged model directory).
"""
