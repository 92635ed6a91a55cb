"""Calibrated rounding for the GGUF types written here with one scale per block of 32 (q4_0, q5_0): GPTQ
(Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers").

Round-to-nearest picks each weight's 4-bit integer alone. GPTQ rounds one input column at a time and moves the
not-yet-rounded columns to cancel the error on the layer's output, weighted by H = E[x xᵀ] of the inputs the
layer really sees (here: the run's own training rows). The file is still plain q4_0: the same block scale rule
(the block's largest-magnitude weight / -8), only better integers, so every llama.cpp build reads it as before.

Why it is here: on the demo, round-to-nearest q4_0 kept 71.5% of the f16 export's exact match (the weights were
a 4-bit Q4_1 grid already, and a second 4-bit grid rounds them again); GPTQ q4_0 keeps over 90% (README, "GGUF").
The gguf package packs the result: each block's largest-magnitude weight is pinned to the grid's end, so its
own quantizer recomputes the very scale and integers chosen here (tests/test_export_gguf.py checks that).

Memory: the model, plus the H of one decoder layer at a time (hidden² and intermediate² floats).
"""

from __future__ import annotations

import re
import time

from .cli import log

# Symmetric block types: scale = (the block's largest-magnitude weight) / -LEVELS[t], integers -L .. L-1.
LEVELS = {"q4_0": 8, "q5_0": 16}
BLOCK = 32
DAMP = 0.01  # of H's mean diagonal, GPTQ's default: keeps H invertible when some inputs barely vary
LAYER = re.compile(r"^(?P<prefix>.*\.layers)\.(?P<i>\d+)\.")


class _Stop(Exception):
    """Raised by a hook once the layer being measured has run: nothing after it is needed."""


def round_to_grid(W, H, levels: int, damp: float = DAMP, act_order: bool = True):
    """W (out, in) rounded GPTQ-style to a symmetric block grid along `in`; returns float32 weights that lie
    exactly on the grid (scale stored in float16, as GGUF does), on W's device.

    Each block's scale comes from the original weights (the file format fixes it per 32 columns); act_order
    rounds the columns whose inputs carry the most energy (H's diagonal) first, while the others can still move
    to absorb their error (GPTQ's "act-order" with static groups)."""
    import torch

    W = W.detach().clone().float()
    H = H.detach().clone().float().to(W.device)
    rows, cols = W.shape
    dead = torch.diag(H) == 0  # an input that was always 0 in calibration: plain rounding for its column
    H[dead, dead] = 1
    blocks = W.reshape(rows, cols // BLOCK, BLOCK)
    pin = blocks.abs().argmax(dim=2)  # (rows, n_blocks): the weight that sets its block's scale
    d = (blocks.gather(2, pin[..., None]).squeeze(2) / -levels).half().float()
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    order = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(cols, device=W.device)
    W, H = W[:, order], H[order][:, order]
    mean_diag = torch.mean(torch.diag(H))
    added = 0.0
    for scale in (damp, damp * 10, damp * 100):  # more damping until H is positive definite
        H.diagonal().add_(scale * mean_diag - added)  # in place: no second cols x cols matrix
        added = scale * mean_diag
        L, info = torch.linalg.cholesky_ex(H)
        if not info:
            break
    else:
        raise ValueError("the calibration inputs give a singular Hessian")
    # upper Cholesky factor of H⁻¹: its rows spread one column's error over the later ones
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    out = torch.empty_like(W)
    top = 2 * levels - 1
    for g in range(0, cols, BLOCK):  # a chunk of columns at a time; the rest is updated once per chunk
        W1 = W[:, g : g + BLOCK].clone()
        Hi = Hinv[g : g + BLOCK, g : g + BLOCK]
        err = torch.zeros_like(W1)
        for i in range(W1.shape[1]):
            col = int(order[g + i])
            b, within = divmod(col, BLOCK)
            w = W1[:, i]
            q = torch.clamp(torch.floor(w * inv[:, b] + levels + 0.5), 0, top)
            q[pin[:, b] == within] = 0  # the scale's own weight sits at the grid's end: re-quantizing finds d
            wq = d[:, b] * (q - levels)
            out[:, g + i] = wq
            e = (w - wq) / Hi[i, i]
            W1[:, i:] -= e[:, None] * Hi[i, i:][None, :]
            err[:, i] = e
        W[:, g + BLOCK :] -= err @ Hinv[g : g + BLOCK, g + BLOCK :]
    return out[:, torch.argsort(order)]


class CalibratedRounding:
    """`rounding(hf_name, weight)` for ftkit.gguf.iter_tensor_data: every linear weight inside a decoder layer is
    rounded with GPTQ against that layer's input statistics on `rows` (token id lists); others are left alone.

    Tensors come in layer order, so the layers run one at a time: the first layer's inputs are captured once,
    and each layer's float outputs become the next layer's inputs (a few MB per row kept, not the whole model's
    activations), with the H of the current layer's linears measured on the way."""

    def __init__(self, model_dir, rows: list[list[int]], qtype: str, n_params: int):
        import torch
        from transformers import AutoModelForCausalLM

        self.levels = LEVELS[qtype]
        self.n_rows = len(rows)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        # float32 where it is cheap (small models on the CPU, whose bf16 matmuls are slow); an 8B model is 32 GB in
        # float32, so larger ones run in bf16. H is accumulated in float32 either way.
        small = self.device == "cpu" and n_params < 2e9
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32 if small else torch.bfloat16, local_files_only=True
        ).to(self.device)
        model.eval()
        self.model = model
        self.seconds = 0.0
        self._next = 0  # index of the layer whose inputs self._inputs holds
        self._H: dict[str, object] = {}
        self._inputs = self._first_layer_inputs(rows)

    def __call__(self, hf_name: str, weight):
        m = LAYER.match(hf_name)
        if m is None or not hf_name.endswith(".weight") or weight.ndim != 2:
            return weight
        layers = self.model.get_submodule(m["prefix"])
        while self._next <= int(m["i"]):
            self._H = self._run_layer(layers[self._next], f"{m['prefix']}.{self._next}")
            self._next += 1
        H = self._H.get(hf_name.rsplit(".", 1)[0])
        if H is None:
            return weight
        t0 = time.time()
        # the writer may have reordered rows (RoPE interleave); H is over columns, so that changes nothing here
        out = round_to_grid(weight.to(self.device), H, self.levels).cpu()
        self.seconds += time.time() - t0
        return out

    def _first_layer_inputs(self, rows: list[list[int]]) -> list[tuple[tuple, dict]]:
        import torch

        t0 = time.time()
        first = self.model.get_submodule(LAYER.match(next(self._linear_names()))["prefix"])[0]
        captured: list[tuple[tuple, dict]] = []

        def grab(_mod, args, kwargs):
            captured.append((args, kwargs))
            raise _Stop

        hook = first.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            with torch.inference_mode():
                for ids in rows:
                    try:
                        self.model(torch.tensor([ids], device=self.device), use_cache=False)
                    except _Stop:
                        pass
        finally:
            hook.remove()
        self.seconds += time.time() - t0
        return captured

    def _linear_names(self):
        import torch

        return (
            f"{n}.weight"
            for n, m in self.model.named_modules()
            if isinstance(m, torch.nn.Linear) and LAYER.match(f"{n}.")
        )

    def _run_layer(self, block, name: str) -> dict:
        import torch

        t0 = time.time()
        H: dict[str, torch.Tensor] = {}
        n: dict[str, int] = {}
        last: list = [None, None, 0]  # the input last seen, its x xᵀ and row count

        def accumulate(key):
            def hook(_mod, args, _out):
                # q/k/v read one input tensor, as do gate/up: its x xᵀ (a third of GPTQ's time on the demo) once
                if last[0] is not args[0]:
                    x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
                    last[:] = [args[0], x.T @ x, x.shape[0]]
                H[key] = H.get(key, 0) + last[1]
                n[key] = n.get(key, 0) + last[2]

            return hook

        hooks = [
            mod.register_forward_hook(accumulate(f"{name}.{sub}"))
            for sub, mod in block.named_modules()
            if isinstance(mod, torch.nn.Linear)
        ]
        try:
            with torch.inference_mode():
                for k, (args, kwargs) in enumerate(self._inputs):
                    out = block(*args, **kwargs)
                    out = out[0] if isinstance(out, tuple) else out
                    self._inputs[k] = ((out, *args[1:]), kwargs)
        finally:
            for h in hooks:
                h.remove()
            last.clear()
        self.seconds += time.time() - t0
        return {k: v / n[k] for k, v in H.items()}

    def close(self) -> None:
        log.info("GPTQ rounding took %.0f s over %d calibration rows", self.seconds, self.n_rows)
        self.model = self._inputs = None
