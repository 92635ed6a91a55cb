"""export_gguf.py for every architecture it maps (ftkit.gguf.ARCHS): tiny models built from transformers' own
config classes, exported, and read back.

Fast tier: the Llama bytes as they were before the architecture tables (a hash of a deterministic export), and for
each architecture an f16 export whose tensor names, shapes and metadata keys are checked against the gguf
package's tables (what llama.cpp loads by). `llamacpp`: each export loaded in llama.cpp, its logits compared
with transformers' for the same token ids.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from pathlib import Path

import pytest
from helpers import SPM_TEXTS, build_tiny_model, offline_tokenizer, sentencepiece_tokenizer, serving

import export_gguf
from ftkit.config import load_config
from ftkit.gguf import SMALL_TYPES
from ftkit.templates import TEMPLATES

# sha256 of export_gguf.py's output for build_tiny_model(llama, seed 0) with the SmolLM2 tokenizer, written by the
# Llama-only writer (commit 3b95f3b) before the writer was built from the gguf package's tables: Llama files
# must stay byte for byte what they were.
LLAMA_BYTES = {
    ("tied", "f16"): "1ce394e3ad39267d422339462ee2038bfa97ca59dee81cb2dc371a787afc4179",
    ("untied", "q8_0"): "ff3fdfdf70dac30efcd59b24e29b1c489fa648c6c063f3cdc1696eadc0cc5d1c",
}


@pytest.fixture(scope="session")
def smol_tok(embedded_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_model)


@pytest.mark.parametrize("tie,qtype", sorted(LLAMA_BYTES))
def test_llama_export_keeps_its_bytes(tmp_path, smol_tok, tie, qtype):
    # the folder's name becomes general.name, so it is fixed
    model = build_tiny_model(tmp_path / f"tiny-llama-{tie}", "llama", smol_tok, seed=0, tied=tie == "tied")
    out = export_gguf.main(load_config(None), None, qtype, tmp_path / "out" / "m.gguf", model_dir=model)
    assert hashlib.sha256(out.read_bytes()).hexdigest() == LLAMA_BYTES[(tie, qtype)]


# The demo model (SmolLM2-135M-Instruct, converted from its packaged GGUF), exported by the same Llama-only writer.
# f16 only: q8_0 of it was fca4d8c4...e568f, but its ~15 s adds nothing the tiny model's q8_0 does not check.
DEMO_BYTES = {"f16": "b5afa2c200ba4343f5c1d898f7c0555026a5dc5b9879eff161fa86a23e26e5b8"}


@pytest.mark.slow
@pytest.mark.parametrize("qtype", sorted(DEMO_BYTES))
def test_demo_model_export_keeps_its_bytes(tmp_path, embedded_model, qtype):
    out = export_gguf.main(load_config(None), None, qtype, tmp_path / "m.gguf", model_dir=Path(embedded_model))
    assert hashlib.sha256(out.read_bytes()).hexdigest() == DEMO_BYTES[qtype]


# (model_type, tied head): each architecture once, tied where its small models tie (Gemma 2 always does).
ARCH_CASES = [
    ("llama", False),
    ("qwen2", True),
    ("mistral", False),
    ("qwen3", True),
    ("phi3", False),
    ("gemma2", True),
    ("gemma3_text", True),
]
# Past Gemma's 4-token test window, so that sliding-window layers attend differently from global ones.
# 28 positions: enough where the top token is decisive (see assert_agree) whatever the random model.
IDS = [0, 40, 500, 60, 270, 80, 90, 100, 200, 300, 44, 345, 17, 99] + list(range(120, 460, 25))


@pytest.fixture(scope="session")
def arch_export(tmp_path_factory):
    """get(model_type, qtype) -> (HF folder, GGUF): each tiny model built once and each export written once per
    test run, shared by the fast-tier checks and the llama.cpp ones. The 512-token offline tokenizer: the GGUF
    reader and llama.cpp parse its vocabulary in milliseconds."""
    root = tmp_path_factory.mktemp("arch")
    tok = offline_tokenizer()
    models: dict[str, Path] = {}
    files: dict[tuple[str, str], Path] = {}

    def get(model_type: str, qtype: str = "f16") -> tuple[Path, Path]:
        if model_type not in models:
            tied = dict(ARCH_CASES)[model_type]
            # general.name comes from the folder's; llama.cpp keys per-token rules on names containing "phi3"
            folder = root / f"tiny-{len(models)}"
            models[model_type] = build_tiny_model(folder, model_type, tok, 0, tied, vocab_size=512)
        if (model_type, qtype) not in files:
            out = root / "out" / f"{model_type}-{qtype}.gguf"
            files[model_type, qtype] = export_gguf.main(
                load_config(None), None, qtype, out, model_dir=models[model_type]
            )
        return models[model_type], files[model_type, qtype]

    return get


def hf_tensors(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(model_dir / "model.safetensors")


@pytest.mark.parametrize("model_type", [m for m, _ in ARCH_CASES])
def test_f16_export_follows_the_gguf_tables(arch_export, model_type):
    """Every tensor is one llama.cpp's table has for the architecture, with the HF tensor's shape (ggml order) and
    values (Gemma's norms + 1, Llama-family q/k rows in llama.cpp's rotary order); every hyperparameter llama.cpp
    reads for it is there, with the config's value."""
    import gguf as gg
    import numpy as np
    from transformers import AutoConfig
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    from ftkit.gguf_arch import ARCHS

    model_dir, out = arch_export(model_type)
    arch, cfg, hf = ARCHS[model_type], AutoConfig.from_pretrained(model_dir), hf_tensors(model_dir)
    reader = gg.GGUFReader(out)
    field = lambda k: reader.fields[k].contents()  # noqa: E731
    assert field("general.architecture") == arch.name
    table = gg.MODEL_TENSORS[gg.MODEL_ARCH[arch.gguf_arch]]
    allowed = {gg.TENSOR_NAMES[t].format(bid=i) for t in table for i in range(cfg.num_hidden_layers)}
    got = {t.name: t for t in reader.tensors}
    assert {n.rsplit(".", 1)[0] for n in got} <= allowed
    names = gg.get_tensor_name_map(gg.MODEL_ARCH[arch.gguf_arch], cfg.num_hidden_layers)
    for hf_name, w in hf.items():
        base, suffix = hf_name.rsplit(".", 1)
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        t = got.pop(f"{names.get_name(base)}.{suffix}")
        assert tuple(int(x) for x in reversed(t.shape)) == tuple(w.shape), hf_name
        data = np.asarray(t.data, dtype=np.float32).reshape(w.shape)
        # stated here, not read from ftkit.gguf_arch: Gemma's RMSNorm scales by 1 + w; llama.cpp's Llama RoPE
        # (Llama, Mistral) rotates adjacent pairs, the other architectures' rotate halves as HF does
        want = w.float().numpy() + (1.0 if model_type.startswith("gemma") and base.endswith("norm") else 0.0)
        if model_type in ("llama", "mistral") and base.endswith(("q_proj", "k_proj")):
            heads = cfg.num_attention_heads if base.endswith("q_proj") else cfg.num_key_value_heads
            data = LlamaTensorProcessor()._reverse_permute_weights(data, heads, heads)
        assert np.allclose(data, want, atol=2e-3, rtol=1e-3), hf_name
    assert got == {}  # nothing written that the checkpoint does not have
    name = arch.name
    keys = {
        gg.Keys.LLM.BLOCK_COUNT: cfg.num_hidden_layers,
        gg.Keys.LLM.EMBEDDING_LENGTH: cfg.hidden_size,
        gg.Keys.LLM.FEED_FORWARD_LENGTH: cfg.intermediate_size,
        gg.Keys.LLM.CONTEXT_LENGTH: cfg.max_position_embeddings,
        gg.Keys.Attention.HEAD_COUNT: cfg.num_attention_heads,
        gg.Keys.Attention.HEAD_COUNT_KV: cfg.num_key_value_heads,
        gg.Keys.Rope.DIMENSION_COUNT: cfg.head_dim,
    }
    if cfg.head_dim != cfg.hidden_size // cfg.num_attention_heads:
        keys |= {gg.Keys.Attention.KEY_LENGTH: cfg.head_dim, gg.Keys.Attention.VALUE_LENGTH: cfg.head_dim}
    if model_type == "gemma2":
        keys |= {
            gg.Keys.LLM.ATTN_LOGIT_SOFTCAPPING: cfg.attn_logit_softcapping,
            gg.Keys.LLM.FINAL_LOGIT_SOFTCAPPING: cfg.final_logit_softcapping,
        }
    if model_type.startswith("gemma"):
        keys[gg.Keys.Attention.SLIDING_WINDOW] = cfg.sliding_window
    for key, value in keys.items():
        assert field(key.format(arch=name)) == pytest.approx(value), key
    assert field(gg.Keys.Rope.FREQ_BASE.format(arch=name)) == pytest.approx(1e6 if model_type == "gemma3_text" else 1e4)
    if model_type == "gemma3_text":  # the global layers' linear RoPE scaling; llama.cpp keeps the sliding ones unscaled
        assert field(gg.Keys.Rope.SCALING_TYPE.format(arch=name)) == "linear"
        assert field(gg.Keys.Rope.SCALING_FACTOR.format(arch=name)) == 8.0


def test_every_mapped_architecture_is_in_the_gguf_tables():
    """What ftkit.gguf_arch requires of each block is what llama.cpp's table has for the architecture (a gguf
    package that renames or drops a tensor fails here, not at load time), and an architecture without an output
    tensor is the one marked always tied."""
    import gguf as gg

    from ftkit.gguf_arch import ARCHS

    for model_type, arch in ARCHS.items():
        table = set(gg.MODEL_TENSORS[gg.MODEL_ARCH[arch.gguf_arch]])
        assert {gg.MODEL_TENSOR[b] for b in arch.blocks} <= table, model_type
        assert (gg.MODEL_TENSOR.OUTPUT not in table) == arch.always_tied, model_type
        assert {gg.MODEL_TENSOR.TOKEN_EMBD, gg.MODEL_TENSOR.OUTPUT_NORM} <= table, model_type


# (model_type, tied, config.json changes, what the one line says): what llama.cpp would compute otherwise
REFUSED = [
    ("gemma2", False, {}, "own output head"),  # llama.cpp's gemma2 reuses the embedding
    ("gemma2", True, {"attn_logit_softcapping": None}, "no logit soft-capping"),
    ("gemma2", True, {"query_pre_attn_scalar": 64}, "query_pre_attn_scalar 64"),
    ("gemma3_text", True, {"layer_types": ["full_attention"] * 6}, "layer_types"),
    ("qwen2", False, {"use_sliding_window": True, "sliding_window": 4}, "sliding-window attention"),
    ("llama", False, {"model_type": "olmo2"}, "'olmo2' model"),  # no mapping at all
]


@pytest.mark.parametrize("model_type,tied,change,says", REFUSED, ids=[f"{r[0]}-{r[3][:12]}" for r in REFUSED])
def test_what_llama_cpp_would_run_differently_is_one_line_and_writes_nothing(tmp_path, model_type, tied, change, says):
    """Exit 2 and one line, naming the architectures that work where there is no mapping; no file."""
    from helpers import run_script

    from ftkit.gguf_arch import ARCHS

    model = build_tiny_model(tmp_path / "m", model_type, offline_tokenizer(), tied=tied, vocab_size=512)
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(cfg | change))
    out = tmp_path / "out" / "m.gguf"
    r = run_script("export_gguf.py", "--model", str(model), "--outfile", str(out))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert says in r.stderr and not out.parent.exists(), r.stderr
    if "model_type" in change:
        assert all(m in r.stderr for m in ARCHS)


# -- inside llama.cpp ----------------------------------------------------------------------------------------------
@functools.cache
def _transformers_logits(model_dir: Path, ids: tuple[int, ...]):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def transformers_logits(model_dir: Path, ids: list[int]):
    # cached: every type of one tiny model is scored against the same reference, loading it once
    return _transformers_logits(model_dir, tuple(ids))


def llama_cpp_logits(path: Path, ids: list[int], lora: Path | None = None):
    import numpy as np

    from ftkit.llamacpp import load

    llm = load(path, lora=lora, n_ctx=64, logits_all=True)
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)])
    finally:
        llm.close()


def cosines(a, b):
    import numpy as np

    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def assert_agree(want, got, cosine: float, margin: float | None) -> None:
    """Logits `got` against the reference `want`, position by position: cosine above `cosine`, and the same top
    token wherever the reference's top-2 margin is at least `margin` (0: everywhere; None: not checked), at four
    positions at least, so that a near-tie that any rounding may flip is not counted as a disagreement."""
    import numpy as np

    cos = cosines(want, got)
    assert cos.min() > cosine, cos.round(5)
    if margin is None:
        return
    top2 = np.sort(want, -1)[:, -2:]
    decisive = top2[:, 1] - top2[:, 0] >= margin
    same = want.argmax(-1) == got.argmax(-1)
    assert decisive.sum() >= 4 and same[decisive].all(), ((top2[:, 1] - top2[:, 0]).round(3), same)


# Observed on these tiny models (logit std 1-2): f16 cosine >= 0.99996, q8_0 >= 0.9966, Q4_K_M >= 0.95 on two layers,
# 0.81 on Gemma 3's six (rows of 64 are not K-quant blocks of 256: llama.cpp falls back to 4/5-bit legacy blocks for
# most tensors, and random weights carry no structure that survives 4 bits).
# The pure-Python 4/5-bit types (round-to-nearest, 32-wide blocks): random weights keep no more of 4-5 bits than
# under Q4_K_M, so its bound.
COSINE = {"f16": 0.999, "q8_0": 0.99, "q4_k_m": 0.75}
COSINE.update({"f32": COSINE["q8_0"], "bf16": COSINE["q8_0"]} | dict.fromkeys(SMALL_TYPES, COSINE["q4_k_m"]))
# The same top token: everywhere at f16; at q8_0 wherever the top-2 margin is wider than 8-bit rounding moves logits
# here (observed max shift 0.22 over these positions); not at Q4_K_M. f32 and bf16 (8-bit mantissa) under q8_0's rule:
# it holds for both, and f32 adds the rows llama.cpp reads unconverted, where a layout slip would not hide in rounding.
MARGIN = {"f16": 0.0, "q8_0": 0.25, "q4_k_m": None}
MARGIN.update({"f32": MARGIN["q8_0"], "bf16": MARGIN["q8_0"]} | dict.fromkeys(SMALL_TYPES, None))


@pytest.mark.llamacpp
@pytest.mark.parametrize("qtype", list(COSINE))
@pytest.mark.parametrize("model_type", [m for m, _ in ARCH_CASES])
def test_llama_cpp_logits_agree_with_transformers(arch_export, model_type, qtype):
    """The same token ids through transformers (float32) and llama.cpp on the export: COSINE and MARGIN."""
    import gguf as gg

    from ftkit.gguf import TYPES

    model_dir, out = arch_export(model_type, qtype)
    assert gg.GGUFReader(out).fields["general.file_type"].contents() == gg.LlamaFileType[TYPES[qtype].file_type]
    assert_agree(transformers_logits(model_dir, IDS), llama_cpp_logits(out, IDS), COSINE[qtype], MARGIN[qtype])


@pytest.mark.llamacpp
@pytest.mark.parametrize("model_type", [m for m, _ in ARCH_CASES])
def test_adapter_gguf_over_the_base_is_the_merged_model(arch_export, tmp_path, model_type):
    """A LoRA on every linear layer (random B, so it changes the logits), written as the architecture's adapter GGUF
    and applied by llama.cpp over the f16 base, gives transformers' merged model's logits."""
    import gguf as gg
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from ftkit.gguf import export_names, plan_adapter, write_adapter_gguf
    from ftkit.gguf_arch import ARCHS

    model_dir, base = arch_export(model_type, "f16")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    lcfg = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    peft_model = get_peft_model(model, lcfg)
    peft_model.save_pretrained(tmp_path / "adapter")
    merged = peft_model.merge_and_unload().eval()
    with torch.no_grad():
        want = merged(torch.tensor([IDS])).logits[0].numpy()
    adapter_cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    ap = plan_adapter(tmp_path / "adapter", adapter_cfg, merged.config, "f32")
    lora = tmp_path / "adapter.gguf"
    write_adapter_gguf(ap, "f32", export_names(merged.config, 10**6, str(model_dir), "t"), lora)
    reader = gg.GGUFReader(lora)
    arch = ARCHS[model_type]
    assert reader.fields["general.architecture"].contents() == arch.name
    kinds, layers = gg.MODEL_TENSORS[gg.MODEL_ARCH[arch.gguf_arch]], range(merged.config.num_hidden_layers)
    table = {gg.TENSOR_NAMES[t].format(bid=i) for t in kinds for i in layers}
    lora_names = {t.name.rsplit(".", 2)[0] for t in reader.tensors}
    linears = [n for n, m in merged.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    assert lora_names <= table and len(reader.tensors) == 2 * len(linears)  # a lora_a and a lora_b for each
    got, plain = llama_cpp_logits(base, IDS, lora), llama_cpp_logits(base, IDS)
    assert_agree(want, got, 0.999, 0.05)  # the adapter's sum is rounded apart from the f16 base: past near-ties
    assert cosines(want, plain).min() < 0.99  # the adapter matters: the check above is not base == base


# Through the stage scripts: the two architectures furthest from Llama in what the export does (Gemma 2's norms,
# soft-capping and windows; Phi-3's fused projections, which LoRA targets by their own names and GPTQ rounds as
# one matrix each), with the merged model's export types (q4_0: GPTQ on the run's rows; on Phi-3 only, ~15 s).
E2E = {"gemma2": ("f16",), "phi3": ("f16", "q4_0")}


@pytest.mark.llamacpp
@pytest.mark.parametrize("model_type", list(E2E))
def test_trained_run_exports_and_runs_in_llama_cpp(arch_export, tmp_path, model_type):
    """finetune.py (a few LoRA steps) -> merge_adapter.py -> export_gguf.py (the merged model at f16 and GPTQ q4_0,
    the adapter, the base with a Modelfile that applies it): llama.cpp on the merged export gives transformers'
    logits for the merged model, and the adapter over the base gives the merged export's."""
    import gguf as gg
    import numpy as np
    from conftest import TINY_ALPACA
    from helpers import run_script, tiny_overrides

    model, _ = arch_export(model_type)
    data = tmp_path / "data.json"
    data.write_text(json.dumps(TINY_ALPACA))
    run = tmp_path / "run"
    extra = {
        "data.prompt_template": "alpaca",
        "lora.target_modules": "all-linear",
        "model.dtype": "float32",
        "train.max_steps": 3,
        "train.learning_rate": 2e-2,  # a few steps that move a random model visibly
        "train.eval_steps": "null",
        "train.load_best_model_at_end": "false",
    }
    over = tiny_overrides(model, data, run, **extra)
    r = run_script("finetune.py", "--config", "configs/demo.yaml", *over)
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_script("merge_adapter.py", "--config", str(run / "config.yaml"))
    assert r.returncode == 0, r.stderr[-3000:]
    for args in [["--type", t] for t in E2E[model_type]] + [["--adapter"], ["--base", "--type", "f16"]]:
        r = run_script("export_gguf.py", "--config", str(run / "config.yaml"), *args)
        assert r.returncode == 0, (args, r.stderr[-3000:])
    export = run / "export"
    (merged,) = [f for f in export.glob("*-F16.gguf")]
    (lora,) = export.glob("*-LoRA.gguf")
    (base,) = (export / "base").glob("*.gguf")
    assert f"ADAPTER ../{lora.name}" in (export / "base" / "Modelfile").read_text().splitlines()
    # trained logits have near-ties that random ones did not: the top token is compared past f16's rounding (0.05)
    want, got = transformers_logits(run / "merged", IDS), llama_cpp_logits(merged, IDS)
    assert_agree(want, got, 0.999, 0.05)
    # q4_0 is GPTQ-rounded on the run's rows, layer by layer of this architecture, and still runs
    for q40 in export.glob("*-Q4_0.gguf"):
        assert "quantize.gptq.rows" in gg.GGUFReader(q40).fields
        assert_agree(want, llama_cpp_logits(q40, IDS), COSINE["q4_k_m"], None)
    assert len(list(export.glob("*.gguf"))) == len(E2E[model_type]) + 1  # the types asked for and the adapter
    split, plain = llama_cpp_logits(base, IDS, lora), llama_cpp_logits(base, IDS)
    assert_agree(got, split, 0.999, 0.05)
    # training moved the logits far more than the adapter's separate rounding does: the check above is not base ==
    # base
    moved, rounding = np.abs(got - plain).mean(), np.abs(got - split).mean()
    assert moved > 5 * rounding, (moved, rounding)


def qwen_style_tokenizer():
    """The offline tokenizer's vocabulary trained behind Qwen2/2.5/3's pre-tokenizer (a Split on its regex, then
    byte-level without a regex of its own): digits one at a time, where Llama 3 groups three."""
    from tokenizers import Regex, pre_tokenizers

    from ftkit.gguf import QWEN2_SPLIT

    split = pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated")
    return offline_tokenizer(
        pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    )


@pytest.mark.llamacpp
def test_qwen_pre_tokenizer_is_named_so_llama_cpp_splits_text_as_qwen_does(tmp_path):
    """A Qwen-style tokenizer's GGUF says tokenizer.ggml.pre 'qwen2' (not 'default', which groups digits and splits
    words otherwise), and llama.cpp then tokenizes text into the ids transformers does."""
    import gguf as gg

    from ftkit.llamacpp import load
    from ftkit.prompts import ALPACA_NO_INPUT

    tok = qwen_style_tokenizer()
    model = build_tiny_model(tmp_path / "tiny", "qwen2", tok, vocab_size=512)
    out = export_gguf.main(load_config(None), None, "f16", tmp_path / "out" / "m.gguf", model_dir=model)
    assert gg.GGUFReader(out).fields["tokenizer.ggml.pre"].contents() == "qwen2"
    llm = load(out, n_ctx=64)
    # text the tokenizer was trained on: its merges span what one regex splits and the other keeps together
    texts = [ALPACA_NO_INPUT.format(instruction="Sort the numbers: 3, 1, 2."), "Add 12345 and 678.", "naïve café 3.14"]
    try:
        for text in texts:
            want = tok(text, add_special_tokens=False)["input_ids"]
            assert llm.tokenize(text.encode(), add_bos=False, special=False) == want, text
    finally:
        llm.close()


# -- SentencePiece vocabularies (Mistral v0.1-v0.3, Phi-3-mini: Llama 2's; Gemma's) -------------------------------
# case -> (model_type, helpers.sentencepiece_tokenizer's style, the chat template the model is trained with: None,
# Alpaca prompts; else the registry's entry, set as the tokenizer's own)
SPM_CASES = {
    "mistral": ("mistral", "llama", None),
    "mistral-chat": ("mistral", "llama", "mistral"),
    "gemma2": ("gemma2", "gemma", "gemma"),
    "phi3": ("phi3", "llama", None),  # Phi-3-mini's vocabulary is Llama 2's
}
CHAT_TURNS = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 plus 3?"},
    {"role": "assistant", "content": "5"},
    {"role": "user", "content": "Double it\n"},
]


@pytest.fixture(scope="session")
def spm_export(tmp_path_factory):
    """get(case) -> (tokenizer, HF folder, f16 GGUF, the SentencePiece model file) for a tiny model with a
    SentencePiece tokenizer of the model's family (helpers.sentencepiece_tokenizer), each built and exported once
    per test run."""
    root = tmp_path_factory.mktemp("spm")
    done: dict[str, tuple] = {}

    def get(case: str):
        if case not in done:
            model_type, style, chat = SPM_CASES[case]
            tok = sentencepiece_tokenizer(root / f"sp-{case}", style)
            if chat:
                tok.chat_template = TEMPLATES[chat].jinja
            # general.name comes from the folder's; llama.cpp keys per-token rules on names containing "phi3"
            folder = root / f"tiny-{len(done)}"
            model = build_tiny_model(folder, model_type, tok, tied=model_type != "phi3", vocab_size=512)
            out = export_gguf.main(load_config(None), None, "f16", root / case / f"{case}.gguf", model_dir=model)
            done[case] = (tok, model, out, root / f"sp-{case}" / "tokenizer.model")
        return done[case]

    return get


def prefix_scheme(tok) -> str | None:
    """The tokenizer.json's Metaspace prepend_scheme (None: no Metaspace, e.g. Gemma's)."""
    pre = json.loads(tok.backend_tokenizer.to_str()).get("pre_tokenizer") or {}
    return pre.get("prepend_scheme") if pre.get("type") == "Metaspace" else None


@pytest.mark.parametrize("case", list(SPM_CASES))
def test_sentencepiece_vocabulary_is_written_as_llama_cpp_reads_it(spm_export, case):
    """tokenizer.ggml.model 'llama': every piece with a score and a type (the 256 <0xNN> pieces BYTE, which llama.cpp's
    byte fallback looks up; <unk> UNKNOWN; BOS/EOS CONTROL), scores that rank each merged piece above the pieces
    merged after it in transformers' merge order, and the dummy space prefix: on for an Alpaca-prompted Mistral or Phi-3
    (Metaspace 'first', text first), off for a Mistral chat model (its prompts start with a special token) and for
    Gemma (none)."""
    import gguf as gg

    tok, _, out, _ = spm_export(case)
    reader = gg.GGUFReader(out)
    field = lambda k: reader.fields[k].contents()  # noqa: E731
    assert field("tokenizer.ggml.model") == "llama" and "tokenizer.ggml.merges" not in reader.fields
    tokens, types, scores = (
        field("tokenizer.ggml.tokens"),
        field("tokenizer.ggml.token_type"),
        field("tokenizer.ggml.scores"),
    )
    assert len(tokens) == len(types) == len(scores) == 512
    assert tokens[: len(tok)] == tok.convert_ids_to_tokens(list(range(len(tok))))
    byte_ids = [i for i, t in enumerate(types) if t == gg.TokenType.BYTE]
    assert [tokens[i] for i in byte_ids] == [f"<0x{b:02X}>" for b in range(256)]
    assert types[tok.unk_token_id] == gg.TokenType.UNKNOWN
    assert types[tok.bos_token_id] == types[tok.eos_token_id] == gg.TokenType.CONTROL
    assert field("tokenizer.ggml.add_space_prefix") == (case in ("mistral", "phi3"))
    chat = SPM_CASES[case][2]
    if chat:  # the Modelfile speaks the family's format, and llama.cpp stops at its end of turn
        from helpers import parse_modelfile

        mf = parse_modelfile((out.parent / "Modelfile").read_text())
        end = TEMPLATES[chat].end_of_turn_text(tok.eos_token)
        assert mf["template"] == TEMPLATES[chat].ollama_form(tok.eos_token) and end in mf["stops"]
        assert field("tokenizer.ggml.eos_token_id") == tok.convert_tokens_to_ids(end)
    assert prefix_scheme(tok) == ("first" if SPM_CASES[case][1] == "llama" else None)
    # the helper's tokenizers put BOS first, as these families do: the flag llama.cpp adds it by
    assert field("tokenizer.ggml.add_bos_token") and tok("a")["input_ids"][0] == tok.bos_token_id
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    made = list(dict.fromkeys("".join(m if isinstance(m, list) else m.split(" ")) for m in merges))
    ranked = [scores[tok.convert_tokens_to_ids(p)] for p in made]
    assert len(made) > 50 and ranked == sorted(ranked, reverse=True) and len(set(ranked)) == len(ranked)


@pytest.mark.llamacpp
@pytest.mark.parametrize("case", list(SPM_CASES))
def test_sentencepiece_export_tokenizes_and_scores_as_transformers_in_llama_cpp(spm_export, case):
    """llama.cpp turns the prompts the model was trained on into the ids transformers does, and its logits for
    those ids agree with transformers' (f16: cosine and top token). Alpaca-prompted and Gemma: plain text with
    spaces, newlines, accents and byte-fallback characters, with and without BOS. Chat models: a chat rendered by
    the family's registered template, special tokens parsed.

    Known differences, transformers' Metaspace against SentencePiece's (and llama.cpp's) dummy prefix: with the
    prefix on, transformers adds no '▁' to text that already starts with a space (there llama.cpp must match the
    model's tokenizer.model); with prepend_scheme 'first', transformers prefixes the start of the input only,
    llama.cpp the start and every text after a special token, so the Alpaca-prompted models' Mistral chat rendering
    carries exactly one extra '▁' after each special token."""
    import sentencepiece as spm

    from ftkit.llamacpp import load

    tok, model_dir, out, sp_file = spm_export(case)
    _, style, chat_name = SPM_CASES[case]
    sp = spm.SentencePieceProcessor(model_file=str(sp_file))
    chat = tok.apply_chat_template(CHAT_TURNS, chat_template=TEMPLATES[chat_name or "mistral"].jinja, tokenize=False)
    llm = load(out, n_ctx=128)
    try:
        plain = [] if case == "mistral-chat" else SPM_TEXTS  # a chat model's prompts start with a special token
        for text in plain:
            want = tok(text, add_special_tokens=False)["input_ids"]
            if text.startswith(" ") and style == "llama":
                assert sp.encode(text) != want  # the difference is still there; else this branch can go
                want = sp.encode(text)
            assert llm.tokenize(text.encode(), add_bos=False, special=False) == want, (text, tok.tokenize(text))
            assert llm.tokenize(text.encode(), add_bos=True, special=False) == [tok.bos_token_id] + want, text
        want, got = tok(chat, add_special_tokens=False)["input_ids"], llm.tokenize(chat.encode(), False, True)
    finally:
        llm.close()
    if case not in ("mistral", "phi3"):
        assert got == want
    else:
        special, space = set(tok.all_special_ids), tok.convert_tokens_to_ids("▁")
        extra = [i for i in range(1, len(got)) if got[i - 1] in special and got[i] == space]
        assert extra and [t for i, t in enumerate(got) if i not in extra] == want
    ids = (want if chat_name else tok(" ".join(SPM_TEXTS))["input_ids"])[:60]
    assert_agree(transformers_logits(model_dir, ids), llama_cpp_logits(out, ids), COSINE["f16"], MARGIN["f16"])


def chat_model(root: Path, model_type: str, chat: str) -> Path:
    """A tiny `model_type` model whose tokenizer carries TEMPLATES[chat] with its turn markers as special tokens (as
    the shipped tokenizers have them), exported at f16."""
    tok = qwen_style_tokenizer() if model_type.startswith("qwen") else offline_tokenizer()
    markers = sorted(set(re.findall(r"<[|a-z_]+>", TEMPLATES[chat].jinja)) - set(tok.all_special_tokens))
    tok.add_special_tokens({"additional_special_tokens": markers})
    tok.chat_template = TEMPLATES[chat].jinja
    model = build_tiny_model(root / f"tiny-{model_type}", model_type, tok, tied=True, vocab_size=512)
    return export_gguf.main(load_config(None), None, "f16", root / f"{model_type}.gguf", model_dir=model)


@pytest.mark.llamacpp
@pytest.mark.parametrize("model_type,chat", [("qwen2", "chatml"), ("gemma2", "gemma")])
def test_serve_answers_the_openai_client_with_the_exports_own_chat_template(tmp_path, model_type, chat):
    """`inference.py --serve` on a non-Llama f16 export: one chat completion through the `openai` client comes back,
    with the prompt the GGUF's own template renders (its token count and the greedy answer of llama.cpp's
    in-process chat, which renders with that template)."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from ftkit.llamacpp import load

    out = chat_model(tmp_path, model_type, chat)
    msgs = [{"role": "user", "content": "What is 2 plus 3?"}]
    with serving("--serve", str(out)) as (client, models):
        reply = client.chat.completions.create(model=models.data[0].id, messages=msgs, temperature=0, max_tokens=8)
    assert reply.choices and reply.choices[0].finish_reason in ("stop", "length"), reply
    llm = load(out, n_ctx=256)
    try:
        assert llm.chat_format == "chat_template.default"  # the GGUF's own template, not a built-in guess
        template = llm.metadata["tokenizer.chat_template"]
        assert template == TEMPLATES[chat].jinja
        eos, bos = (llm._model.token_get_text(t) for t in (llm.token_eos(), llm.token_bos()))
        # Gemma's template writes BOS itself; ChatML's has none, and the server adds none on top of either
        prompt = Jinja2ChatFormatter(template, eos_token=eos, bos_token=bos)(messages=msgs).prompt
        ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
        direct = llm.create_chat_completion(msgs, temperature=0.0, max_tokens=8)
    finally:
        llm.close()
    assert reply.usage.prompt_tokens == direct["usage"]["prompt_tokens"] == len(ids), (reply.usage, direct, ids)
    assert reply.choices[0].message.content == direct["choices"][0]["message"]["content"]
