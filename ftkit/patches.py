"""Every runtime patch of a library object the project makes, in one place. Each says why, which library
version it was written against, and which test fails once the library no longer needs it (so it can go).

  class swaps of decoder modules   transformers 5.17   tiled MLP and offloaded checkpoints for long rows
                                                       (tests/test_long_rows.py: numbers unchanged; the
                                                       patch test below fails when transformers ships both)
"""
from __future__ import annotations

import torch

# -- long rows: tiled MLP and offloaded checkpoints --------------------------------------------------------
def decoder_layers(model) -> list:
    """The repeated blocks that gradient checkpointing wraps (transformers' GradientCheckpointingLayer)."""
    from transformers.modeling_layers import GradientCheckpointingLayer
    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def use_tiled_mlp(model, chunk_tokens: int | None = None) -> int:
    """Run every decoder layer's MLP over the sequence in chunks of `chunk_tokens` (default: hidden_size, as
    DeepSpeed's TiledMLP), each under its own non-reentrant checkpoint: forward keeps only the chunk inputs, and
    backward rebuilds one chunk's gate/up/activation at a time. The MLP acts on each token alone, so chunking
    the sequence changes no result. Returns the number of MLPs patched.

    The chunking wraps the module's __call__, not its forward: liger-kernel replaces the MLP's forward when the
    Trainer starts, after this has run."""
    chunk = chunk_tokens or int(getattr(getattr(model, "config", None), "hidden_size", 0) or 4096)
    mlps = [layer.mlp for layer in decoder_layers(model) if getattr(layer, "mlp", None) is not None]
    for mlp in mlps:
        _wrap_call(mlp, "_ftkit_tiled", _tiled_call)
        mlp._ftkit_chunk = chunk
    return len(mlps)


def offload_layer_inputs(model, n_layers: int) -> int:
    """Keep the checkpointed inputs of the first `n_layers` decoder layers in (pinned) CPU RAM.

    Not TRL's `activation_offloading`: that offloads everything the whole forward saves, all or nothing, and the
    checkpoints of one very long row (2 bytes x hidden x layers a token: 256 KB for Llama-3-8B, 360 GB for 1.4M
    tokens) can exceed the host's RAM too; offloading only some layers splits them between GPU and host. The
    copies are synchronous (torch's save_on_cpu): at the lengths where this is needed, attention dominates."""
    layers = decoder_layers(model)[:n_layers]
    for layer in layers:
        _wrap_call(layer, "_ftkit_offload", _offloading_call)
    return len(layers)


def _tiled_call(call):
    def __call__(self, x, *args, **kwargs):
        if args or kwargs or not torch.is_grad_enabled() or x.shape[-2] <= self._ftkit_chunk:
            return call(self, x, *args, **kwargs)
        import torch.utils.checkpoint as tc
        return torch.cat([tc.checkpoint(call, self, part, use_reentrant=False)
                          for part in x.split(self._ftkit_chunk, dim=-2)], dim=-2)
    return __call__


def _offloading_call(call):
    def __call__(self, *args, **kwargs):
        if not (self.training and torch.is_grad_enabled()):
            return call(self, *args, **kwargs)
        # What the layer saves for backward goes to CPU RAM: under checkpointing that is the layer's input
        # (kept for the recompute), copied back when backward reaches this layer.
        with torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()):
            return call(self, *args, **kwargs)
    return __call__


_WRAPPED_CLASSES: dict[tuple[type, str], type] = {}


def _wrap_call(module, marker: str, wrap) -> None:
    """Swap in a subclass of the module's class whose __call__ is wrap(the class's __call__), marked by the
    class attribute `marker` (benchmarks/train_throughput.py undoes it by that mark). It keeps the class name,
    so FSDP wrap policies and repr still see the model's own class, and the state dict keys do not change."""
    cls = type(module)
    if getattr(cls, marker, False):
        return
    if (cls, marker) not in _WRAPPED_CLASSES:
        _WRAPPED_CLASSES[cls, marker] = type(cls.__name__, (cls,), {"__call__": wrap(cls.__call__), marker: True,
                                                                    "__module__": cls.__module__})
    module.__class__ = _WRAPPED_CLASSES[cls, marker]


