"""The library under the stage scripts, one module per concern (README "Layout" lists them): config and CLI,
run directories and locks, data and prompts, models and quantization, the training plan, training,
generation, scoring and export.

The stages import from here; nothing here imports a stage.
"""
