"""Shared helpers for the stage scripts: config, run-directory paths, prompts, logging/errors, model loading.

The stages import from here; nothing here imports a stage.
"""
