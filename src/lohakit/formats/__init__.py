"""File formats: PEFT directories, kohya/LyCORIS single files."""
