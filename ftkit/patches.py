"""Every runtime patch of a library object the project makes, in one place. Each entry says why, which
library version it was written against, and which test in tests/test_patches.py fails once the library
no longer needs it (then delete the patch and its test). Every tripwire still holds on the pinned versions
(transformers 5.25.0, accelerate 1.16.0, trl 1.16, peft 0.21, torch 2.13).

  patch                                  written against        tripwire test
  class swaps of decoder modules         transformers 5.17      test_transformers_has_no_tiled_mlp
    (tiled MLP, offloaded checkpoints:     (long rows; liger replaces forward, so __call__ is wrapped)
    use_tiled_mlp, offload_layer_inputs)
  torch.serialization location "cpu:N"   torch 2.13,            test_torch_still_refuses_indexed_cpu_locations
    (allow_indexed_cpu_locations)          transformers 5.17
  collator class swap (log_first_batch)  transformers 5.17      test_callbacks_still_do_not_see_the_batch
  LoRA weights back to fp32 after TRL    trl 1.16, peft 0.21    test_trl_still_casts_qlora_adapters_to_bf16
    (keep_lora_fp32)
  TRL's "ref" adapter copy deleted       trl 1.16, peft 0.21    test_trl_still_copies_the_adapter_as_reference
    (drop_reference_adapter_copy;          (DPO, KTO, and GRPO
    DPO/KTO, and GRPO with beta > 0)        with beta > 0)
  a trainer's method timed (time_calls:  trl 1.16               test_grpo_samples_in_one_method
    GRPO's sampling time apart from the
    rest of a step, in train_log.jsonl
    and the GRPO benchmark)

Not patches: the "sdpa_varlen" attention (ftkit/attention.py) goes through transformers' public
AttentionInterface.register, and liger-kernel's kernels are applied by the Trainer itself.
"""

from __future__ import annotations

import inspect

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

        return torch.cat(
            [tc.checkpoint(call, self, part, use_reentrant=False) for part in x.split(self._ftkit_chunk, dim=-2)],
            dim=-2,
        )

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
    class attribute `marker` (unwrap_calls undoes it by that mark). It keeps the class name,
    so FSDP wrap policies and repr still see the model's own class, and the state dict keys do not change."""
    cls = type(module)
    if getattr(cls, marker, False):
        return
    if (cls, marker) not in _WRAPPED_CLASSES:
        _WRAPPED_CLASSES[cls, marker] = type(
            cls.__name__, (cls,), {"__call__": wrap(cls.__call__), marker: True, "__module__": cls.__module__}
        )
    module.__class__ = _WRAPPED_CLASSES[cls, marker]


def unwrap_calls(model) -> None:
    """Undo _wrap_call on every module of `model` (the tiled MLP, the offloading): each back to its own class, as
    a benchmark needs to run the same loaded model again without them."""
    for m in model.modules():
        while any(getattr(type(m), marker, False) for _, marker in _WRAPPED_CLASSES):
            m.__class__ = type(m).__mro__[1]


# -- resume under multi-process CPU training ---------------------------------------------------------------
def allow_indexed_cpu_locations() -> None:
    """The Trainer loads the optimizer state with map_location=args.device, which is "cpu:<rank>" under several
    CPU processes, and torch.load knows only "cpu": teach torch's location registry that "cpu:N" is the CPU.
    (On GPUs the location is "cuda:N", which torch knows.)"""
    import torch.serialization as ser

    def restore(obj, location):
        if location.startswith("cpu:"):
            return obj.cpu()
        return None

    if not getattr(ser, "_ftkit_cpu_index", False):
        taken = {entry[0] for entry in ser._package_registry}
        ser.register_package(next(n for n in range(90, 200) if n not in taken), lambda obj: None, restore)
        ser._ftkit_cpu_index = True


# -- which rows a rank's first batch holds ---------------------------------------------------------------------
def log_first_batch(collator, log_fn):
    """Call log_fn(rows) once with a short hash of every row of the first batch this collator builds: under DDP
    the ranks must take different shards, and two runs with the same seed must start on the same rows. No
    Trainer callback sees a batch's inputs, so the collator's class is swapped for a subclass (isinstance checks
    in TRL still hold); a plain function (GRPOTrainer's, which passes the rows through) is wrapped instead.
    Returns the collator to use."""
    import zlib

    def log_once(features):
        log_fn([f"{zlib.crc32(str(_row_ids(f)).encode()):08x}" for f in features])

    if inspect.isfunction(collator):
        state = {"logged": False}

        def first_batch_logged(features, *args, **kwargs):
            if not state["logged"]:
                state["logged"] = True
                log_once(features)
            return collator(features, *args, **kwargs)

        return first_batch_logged
    base = type(collator)

    class FirstBatchLogged(base):
        def __call__(self, features, *args, **kwargs):
            if not getattr(self, "_first_logged", False):
                self._first_logged = True
                log_once(features)
            return base.__call__(self, features, *args, **kwargs)

    collator.__class__ = FirstBatchLogged
    return collator


def _row_ids(f: dict) -> list:
    """A row's token ids: SFT's input_ids, or every id column of a preference row (prompt and both sides)."""
    if "input_ids" in f:
        return list(f["input_ids"])
    if isinstance(f.get("prompt"), str) and "prompt_input_ids" not in f:  # GRPO's rows: the prompt's text
        return f["prompt"]
    return [list(f[k]) for k in sorted(f) if k.endswith("_ids")]


# -- QLoRA adapters in fp32 ------------------------------------------------------------------------------------
def keep_lora_fp32(model) -> int:
    """Undo TRL's cast of a quantized model's LoRA weights to bf16 (SFTTrainer.__init__): a resume reloads them
    through PEFT in fp32, so without this the resumed run would train in another dtype than the first one
    (PEFT issue 2889: autocast_adapter_dtype=False is not supported for quantized models). bf16 autocast still
    runs the matmuls in bf16. Returns the number of tensors recast."""
    n = 0
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
            n += 1
    return n


# -- the DPO/KTO reference ---------------------------------------------------------------------------------------
def drop_reference_adapter_copy(model) -> bool:
    """Delete the "ref" adapter TRL's DPOTrainer and KTOTrainer add to a PEFT model they are given (a copy of its
    adapter, for re-training an existing one). Here the adapter is new and starts as no change (the config makes
    train.method=dpo|kto use lora.init_lora_weights=true), so the copy equals the base: without it TRL computes the
    reference with the adapter disabled, as for a PEFT config, and no copy is kept, run or saved into adapter/.
    Returns whether there was one."""
    if "ref" not in getattr(model, "peft_config", {}):
        return False
    model.delete_adapter("ref")
    return True


# -- timing one method of an object (benchmarks) ---------------------------------------------------------------
def time_calls(obj, name: str, sink: dict) -> None:
    """Wrap obj.<name> (on the instance, not its class) so each call's wall time is appended to sink[name]: GRPO's
    logs and benchmark split a step into sampling (GRPOTrainer._generate in TRL 1.16) and the rest, which no
    callback can, since both happen inside one training_step. On a GPU each call ends with a synchronize, so
    queued kernels count where they run."""
    import time

    inner = getattr(obj, name)
    times = sink.setdefault(name, [])

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        out = inner(*args, **kwargs)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        return out

    setattr(obj, name, timed)
