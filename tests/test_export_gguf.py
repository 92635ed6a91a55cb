"""export_gguf.py, verified rather than hoped: the exported GGUF is loaded back with transformers (`gguf_file=`)
and must give the source model's logits within a stated tolerance per format, tokenize the same, and carry the
training chat template; the Modelfile's Go template must render the training prompt.

Tolerances (max |logit difference| over every position of the fixed prompts, both models in float32):
  f16:  1e-3 and identical greedy tokens. bf16 weights convert to f16 exactly (observed: 0.0 on SmolLM2).
  q8_0: SmolLM2-135M: max 2.5 (observed ~1.4 at logit std ~5-8), mean 0.3 (observed ~0.15), identical greedy
        tokens wherever the source's top-2 margin is at least 1.0 (disagreements seen only at margins ~0.1),
        at least 90% identical overall (observed 94-97%), and the same 16-token greedy answer.
        Tiny random models (logits ~0.1 apart): max 0.02.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import REPO, go_render, parse_modelfile, run_script
from test_inference import make_run

import export_gguf
from ftkit import gguf
from ftkit.config import load_config
from ftkit.errors import UserError
from ftkit.prompts import PromptTemplate

TEXTS = [
    "Hello world! 12345 67 ünïcödé 你好 🤗",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n",
    "  two spaces\n\n\ttab",
    "def f(x):\n    return x ** 2  # square",
    "Give three tips for staying healthy.",
]


@pytest.fixture(scope="session")
def small_llama(tmp_path_factory, embedded_model) -> Path:
    """A 2-layer random Llama (untied head) with a 600-token byte-level BPE tokenizer that has SmolLM2's ChatML
    special tokens and chat template, and 8 embedding rows more than tokens (padding, as many models have).
    Small vocabulary: transformers' GGUF reader parses every token in Python, ~5 s for SmolLM2's 49k."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("small-llama")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        TEXTS * 3 + [(REPO / "README.md").read_text()],
        trainers.BpeTrainer(
            vocab_size=600,
            special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    tok.chat_template = AutoTokenizer.from_pretrained(embedded_model).chat_template
    tok.save_pretrained(out)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok) + 8,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    return out


def load_pair(src: Path, gguf: Path):
    from transformers import AutoModelForCausalLM

    a = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    b = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    return a.eval(), b.eval()


def logit_stats(a, b, id_lists: list[list[int]]) -> dict:
    diffs, agree, decisive_agree, n = [], 0, [], 0
    with torch.no_grad():
        for ids in id_lists:
            t = torch.tensor([ids])
            la, lb = a(t).logits[0], b(t).logits[0]
            diffs.append((la - lb).abs())
            top2 = la.topk(2, -1).values
            same = la.argmax(-1) == lb.argmax(-1)
            agree += same.sum().item()
            n += len(ids)
            decisive_agree.append(same[(top2[:, 0] - top2[:, 1]) >= 1.0])
    d = torch.cat([x.flatten() for x in diffs])
    return {
        "max": d.max().item(),
        "mean": d.mean().item(),
        "agreement": agree / n,
        "decisive_agreement": torch.cat(decisive_agree).float().mean().item(),
    }


def check_tokenizer(src: Path, gguf: Path) -> None:
    from transformers import AutoTokenizer

    ta = AutoTokenizer.from_pretrained(src)
    tb = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    for text in TEXTS:
        ia = ta(text, add_special_tokens=False)["input_ids"]
        assert tb(text, add_special_tokens=False)["input_ids"] == ia, text
        assert tb.decode(ia) == ta.decode(ia), text
    assert tb.chat_template == ta.chat_template
    msgs = [{"role": "user", "content": "Hi there"}]
    assert tb.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) == ta.apply_chat_template(
        msgs, add_generation_prompt=True, tokenize=False
    )


# -- the pieces -------------------------------------------------------------------------------------------------
def test_rope_row_interleave_is_what_llama_cpp_and_transformers_expect():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = torch.randn(4 * 16, 8)
    out = gguf.interleave_rope_rows(w, 4)
    # Row i of each head moves to 2i, row i + d/2 to 2i + 1 (adjacent pairs rotate together in llama.cpp).
    assert torch.equal(out[0], w[0]) and torch.equal(out[1], w[8]) and torch.equal(out[2], w[1])
    assert torch.equal(out[16 + 3], w[16 + 8 + 1])
    undo = LlamaTensorProcessor()._reverse_permute_weights(out.numpy(), 4, 4)
    assert np.array_equal(undo, w.numpy())
    b = torch.randn(2 * 16)  # biases move with their rows
    assert np.array_equal(
        LlamaTensorProcessor()._reverse_permute_weights(gguf.interleave_rope_rows(b, 2).numpy(), 4, 2), b.numpy()
    )


def test_llama3_rope_factors_match_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = LlamaConfig(
        hidden_size=4096,
        num_attention_heads=32,
        max_position_embeddings=131072,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    )
    inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    base = 1.0 / 500000.0 ** (torch.arange(0, 128, 2, dtype=torch.float64) / 128)
    factors = torch.tensor(gguf.llama3_rope_factors(cfg), dtype=torch.float64)
    assert factors.shape == (64,) and factors[0] == 1.0 and factors[-1] == 8.0
    assert torch.allclose(base / factors, inv_freq.double(), rtol=1e-5)


# -- round trips -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "qtype,tol,agree",
    [
        ("f16", 1e-3, 1.0),
        ("q8_0", 0.02, 1.0),
        ("bf16", 1e-5, 1.0),
        ("f32", 1e-5, 1.0),
        # random logits ~0.1 apart: below 8 bits a few near-ties flip (observed: q5 max 0.04, 92% agreement)
        ("q5_1", 0.08, 0.8),
        ("q5_0", 0.08, 0.8),
        ("q4_0", 0.16, 0.7),
    ],
)
def test_tiny_llama_round_trips(tmp_path, small_llama, qtype, tol, agree):
    """A merged random Llama in a run directory, exported to the default place, read back by transformers."""
    cfg, run = make_run(tmp_path / "run", small_llama)
    out = export_gguf.main(cfg, run, qtype)
    # llama.cpp's naming: <BaseName>-<Size>-<FineTune>-<TYPE>.gguf, the run's name as the fine-tune
    assert out.parent == run.export and out.name.endswith(f"-{run.root.name}-{qtype.upper()}.gguf"), out.name
    assert sorted(p.name for p in run.export.iterdir()) == sorted([out.name, "Modelfile"])
    a, b = load_pair(small_llama, out)
    stats = logit_stats(a, b, [[1, 40, 50, 60, 70, 80, 90, 100], list(range(5, 600, 37))])
    assert stats["max"] <= tol and stats["agreement"] >= agree, stats
    check_tokenizer(small_llama, out)


@pytest.mark.parametrize("qtype", ["q4_0", "q5_0"])
def test_gptq_rounding_is_plain_blocks_and_moves_layer_outputs_less(qtype):
    """GPTQ's weights lie exactly on the type's grid (the gguf package packs them back to the very same values) and
    change the layer's output on correlated inputs less than round-to-nearest does."""
    import gguf as gg

    from ftkit.gptq import LEVELS, round_to_grid

    g = torch.Generator().manual_seed(0)
    X = torch.randn(2048, 16, generator=g) @ torch.randn(16, 128, generator=g) + 0.1 * torch.randn(
        2048, 128, generator=g
    )
    W = torch.randn(96, 128, generator=g) * 0.05
    W[:, 7] *= 20  # an outlier column, as real layers have
    gt = gg.GGMLQuantizationType[qtype.upper()]
    Wq = round_to_grid(W, X.T @ X / len(X), LEVELS[qtype])
    assert np.array_equal(gg.quants.dequantize(gg.quants.quantize(Wq.numpy(), gt), gt), Wq.numpy())
    rtn = torch.from_numpy(gg.quants.dequantize(gg.quants.quantize(W.numpy(), gt), gt))
    err_gptq = (X @ (W - Wq).T).pow(2).mean().item()
    err_rtn = (X @ (W - rtn).T).pow(2).mean().item()
    assert err_gptq < 0.7 * err_rtn, (err_gptq, err_rtn)
    assert not torch.equal(Wq, rtn)


def test_q4_0_export_is_calibrated_on_the_runs_training_rows(tmp_path, small_llama):
    """A run's q4_0 export rounds with GPTQ on its training rows and says so in the file; --calibration-rows 0
    writes plain round-to-nearest; without readable training rows it falls back with a warning."""
    import gguf as gg

    cfg, run = make_run(tmp_path / "run", small_llama)
    data = Path(cfg.data.path)
    rows = [{"instruction": f"Add {i} and {i + 1}.", "input": "", "output": f"{2 * i + 1}"} for i in range(40)]
    rows.append({"instruction": "Repeat this. " * 400, "input": "", "output": "no"})  # longer than max_length
    data.write_text(json.dumps(rows))
    out = tmp_path / "gptq.gguf"
    # data.too_long=fail is training's policy; calibration takes a long row's first max_length tokens instead
    cmd = ["--config", str(run.root / "config.yaml"), "data.too_long=fail", "--type", "q4_0"]
    r = run_script("export_gguf.py", *cmd, "--outfile", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    logged = int(re.search(r"GPTQ rounding calibrated on (\d+) training rows", r.stderr)[1])
    assert 30 <= logged <= 41  # all the training split (held-out rows excluded), under the default 256
    assert int(gg.GGUFReader(out).fields["quantize.gptq.rows"].parts[-1][0]) == logged
    plain = tmp_path / "plain.gguf"
    r = run_script(
        "export_gguf.py",
        "--config",
        str(run.root / "config.yaml"),
        "--type",
        "q4_0",
        "--outfile",
        str(plain),
        "--calibration-rows",
        "0",
    )
    assert r.returncode == 0 and "GPTQ" not in r.stderr, r.stderr[-3000:]
    assert "quantize.gptq.rows" not in gg.GGUFReader(plain).fields
    ta = {t.name: t.data.copy() for t in gg.GGUFReader(out).tensors}
    tb = {t.name: t.data.copy() for t in gg.GGUFReader(plain).tensors}
    assert not np.array_equal(ta["blk.0.ffn_down.weight"], tb["blk.0.ffn_down.weight"])  # other integers
    assert np.array_equal(ta["token_embd.weight"], tb["token_embd.weight"])  # only layer linears are GPTQ'd
    a, b = load_pair(small_llama, out)
    stats = logit_stats(a, b, [[1, 40, 50, 60, 70, 80, 90, 100], list(range(5, 600, 37))])
    assert stats["max"] <= 0.16 and stats["agreement"] >= 0.7, stats
    r = run_script("export_gguf.py", "--config", str(run.root / "config.yaml"), "--calibration-rows", "8")
    assert r.returncode == 0 and "--type f16 ignores it" in r.stderr, r.stderr[-3000:]
    data.unlink()  # the training data is gone: the export still works, rounding to nearest, and says why
    gone = tmp_path / "gone.gguf"
    r = run_script(
        "export_gguf.py", "--config", str(run.root / "config.yaml"), "--type", "q4_0", "--outfile", str(gone)
    )
    assert r.returncode == 0 and "rounds to nearest" in r.stderr, r.stderr[-3000:]
    assert "quantize.gptq.rows" not in gg.GGUFReader(gone).fields


@pytest.mark.slow
def test_smollm2_demo_model_round_trips(tmp_path, embedded_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(embedded_model)
    questions = [
        "What is the capital of France?",
        "Give three tips for staying healthy.",
        "Write a haiku about the sea.",
    ]
    prompts = [
        tok(
            tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True),
            add_special_tokens=False,
        )["input_ids"]
        for q in questions
    ]
    cfg = load_config(None)
    for qtype in ("f16", "q8_0"):
        out = export_gguf.main(cfg, None, qtype, tmp_path / f"smol-{qtype}.gguf", model_dir=embedded_model)
        a, b = load_pair(embedded_model, out)
        stats = logit_stats(a, b, prompts)
        if qtype == "f16":
            assert stats["max"] <= 1e-3 and stats["agreement"] == 1.0, stats
        else:
            check_tokenizer(embedded_model, out)
            assert stats["max"] <= 2.5 and stats["mean"] <= 0.3, stats
            assert stats["decisive_agreement"] == 1.0 and stats["agreement"] >= 0.9, stats
            ids = torch.tensor([prompts[0]])
            ga = a.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=2)
            gb = b.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=2)
            assert torch.equal(ga, gb) and "Paris" in tok.decode(ga[0, ids.shape[1] :])
        del a, b
    assert (tmp_path / "smol-f16.gguf").stat().st_size > 2 * 135e6 * 0.95
    assert (tmp_path / "smol-q8_0.gguf").stat().st_size < 0.6 * (tmp_path / "smol-f16.gguf").stat().st_size


def test_cli_exports_the_most_recent_run(tmp_path, small_llama):
    import gguf

    cfg, run = make_run(tmp_path / "runs" / "r", small_llama)
    r = run_script("export_gguf.py", "--type", "q8_0", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    (out,) = run.export.glob("*-Q8_0.gguf")
    reader = gguf.GGUFReader(out)
    field = lambda k: reader.fields[k].contents()  # noqa: E731
    template = PromptTemplate.load(run.prompt_template)
    assert field("general.architecture") == "llama" and field("tokenizer.ggml.model") == "gpt2"
    assert field("general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
    assert field("tokenizer.chat_template") == template.chat_template
    assert field("tokenizer.ggml.eos_token_id") == 2 == field("tokenizer.ggml.eot_token_id")  # <|im_end|>
    tokens, types = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.token_type")
    assert len(tokens) == 608 and tokens[600:] == [f"[PAD{i}]" for i in range(600, 608)]
    assert types[:3] == [gguf.TokenType.CONTROL] * 3 and types[3] == gguf.TokenType.NORMAL
    assert types[600] == gguf.TokenType.UNUSED and field("tokenizer.ggml.add_bos_token") is False
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert (
        "output.weight" in types and types["blk.0.attn_q.weight"] == "Q8_0" and types["blk.0.attn_norm.weight"] == "F32"
    )
    assert types["output.weight"] == "Q8_0"  # untied head
    assert f"FROM ./{out.name}" in (run.export / "Modelfile").read_text()
    assert field("general.finetune") == "r" and field("general.size_label") == out.name.split("-")[-3]


# -- the Modelfile -------------------------------------------------------------------------------------------------
def test_modelfile_renders_the_training_prompt(tmp_path, tiny_llama, monkeypatch):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    icfg = load_config(None).inference
    conv = [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "What is 2+2?"},
    ]

    chat = PromptTemplate.from_config("chat", tok)  # SmolLM2: ChatML with a built-in default system prompt
    mf = parse_modelfile(gguf.modelfile_text("m.gguf", tok, chat, icfg, False, "src"))
    assert mf["from"] == "./m.gguf" and "<|im_end|>" in mf["stops"]
    assert mf["system"].startswith("You are a helpful AI assistant named SmolLM")
    # Ollama hands the template the Modelfile's SYSTEM (or the user's) and the messages, system ones included.
    go = lambda msgs: [{"Role": m["role"], "Content": m["content"]} for m in msgs]  # noqa: E731
    want = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    assert go_render(mf["template"], {"System": mf["system"], "Messages": go(conv)}) == want
    assert go_render(mf["template"], {"System": mf["system"], "Messages": go(conv[:1])}) == chat.render_prompt(
        tok, "Hi!"
    )
    sys_conv = [{"role": "system", "content": "Be brief."}] + conv
    assert go_render(mf["template"], {"System": "Be brief.", "Messages": go(sys_conv)}) == tok.apply_chat_template(
        sys_conv, tokenize=False, add_generation_prompt=True
    )

    # A chat template of no known style: a single-turn template cut from the training render itself.
    monkeypatch.setattr(gguf, "chat_style", lambda tok, t: None)
    mf = parse_modelfile(gguf.modelfile_text("m.gguf", tok, chat, icfg, False, "src"))
    assert go_render(mf["template"], {"Prompt": "Hi!", "System": ""}) == chat.render_prompt(tok, "Hi!")
    assert go_render(mf["template"], {"Prompt": "Hi!", "System": "Be brief."}) == PromptTemplate.from_config(
        "chat", tok, system_prompt="Be brief."
    ).render_prompt(tok, "Hi!")
    monkeypatch.undo()

    for system in (None, "You answer tersely."):
        alpaca = PromptTemplate.from_config("alpaca", tok, system_prompt=system)
        mf = parse_modelfile(gguf.modelfile_text("m.gguf", tok, alpaca, icfg, False, "src"))
        want = alpaca.render_prompt(tok, "Name a colour.")
        assert go_render(mf["template"], {"Prompt": "Name a colour.", "System": mf["system"]}) == want
        # The GGUF's Jinja chat template (what llama.cpp's chat mode uses) renders the same prompt.
        jinja = gguf.gguf_chat_template(alpaca)
        msgs = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": "Name a colour."}
        ]
        assert tok.apply_chat_template(msgs, chat_template=jinja, tokenize=False, add_generation_prompt=True) == want
        assert mf["stops"] == [tok.eos_token]


# -- bad input -------------------------------------------------------------------------------------------------------
LLAMA3_JINJA = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if "
    "add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def llama3_base_tokenizer():
    """Llama-3's special tokens on a small byte-level BPE, with no chat template: the Llama-3 base's shape."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    bpe.train_from_iterator(
        TEXTS,
        trainers.BpeTrainer(
            vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    bpe.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 0)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>")


def test_modelfile_for_a_llama3_chat_template(tmp_path):
    """Llama-3 Instruct's template (its special tokens on a small byte-level BPE): multi-turn Go template."""
    tok = llama3_base_tokenizer()
    tok.chat_template = LLAMA3_JINJA
    template = PromptTemplate.from_config("chat", tok)
    assert gguf.chat_style(tok, template) == "llama3"
    vocab = gguf.read_vocab(tok, template, 300)
    assert vocab.add_bos and vocab.eos_id == vocab.eot_id == tok.convert_tokens_to_ids("<|eot_id|>")
    mf = parse_modelfile(
        gguf.modelfile_text("m.gguf", tok, template, load_config(None).inference, vocab.add_bos, "src")
    )
    assert "<|eot_id|>" in mf["stops"] and mf["system"] == ""
    conv = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "What is 2+2?"},
    ]
    go = [{"Role": m["role"], "Content": m["content"]} for m in conv]
    want = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    # llama.cpp adds <|begin_of_text|> itself (add_bos_token), so the Ollama template leaves it out.
    assert "<|begin_of_text|>" + go_render(mf["template"], {"System": "Be brief.", "Messages": go}) == want
    assert "<|begin_of_text|>" + go_render(
        mf["template"], {"System": "", "Messages": go[1:]}
    ) == tok.apply_chat_template(conv[1:], tokenize=False, add_generation_prompt=True)


def test_bad_input_is_one_line_and_writes_nothing(tmp_path, tiny_llama, monkeypatch):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = load_config(None)
    out = tmp_path / "out" / "m.gguf"
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(
        GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100, n_positions=64, bos_token_id=0, eos_token_id=0)
    ).save_pretrained(gpt2)
    r = run_script("export_gguf.py", "--model", str(gpt2), "--outfile", str(out))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "'gpt2' model" in r.stderr and "llama" in r.stderr

    with pytest.raises(UserError, match="does not exist"):
        export_gguf.main(cfg, None, "f16", out, tmp_path / "nowhere")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama, broken)
    (broken / "config.json").unlink()
    with pytest.raises(UserError, match="has no config.json"):
        export_gguf.main(cfg, None, "f16", out, broken)
    shutil.copy(tiny_llama / "config.json", broken / "config.json")
    with open(broken / "model.safetensors", "r+b") as f:
        f.truncate(2_000_000)
    with pytest.raises(UserError, match="truncated"):
        export_gguf.main(cfg, None, "f16", out, broken)
    (broken / "model.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{bad}")
    with pytest.raises(UserError, match="corrupt"):
        export_gguf.main(cfg, None, "f16", out, broken)
    with pytest.raises(UserError, match="--model needs --outfile"):
        export_gguf.main(cfg, None, "f16", None, tiny_llama)
    cfg_run, run = make_run(tmp_path / "run", tiny_llama, merged=False)
    with pytest.raises(UserError, match="no merged model"):
        export_gguf.main(cfg_run, run, "f16")

    # A failure in the middle of writing the weights leaves no file (and no temporary file) behind.
    real = gguf.iter_tensor_data

    def dying(ckpt, plans, *rest):
        yield next(iter(real(ckpt, plans, *rest)))
        raise OSError("disk on fire")

    monkeypatch.setattr(gguf, "iter_tensor_data", dying)
    with pytest.raises(OSError, match="disk on fire"):
        export_gguf.main(cfg, None, "f16", out, tiny_llama)
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


def test_the_shipped_llama3_template_on_a_base_tokenizer_exports_as_llama3():
    """A Llama-3 *base* (no chat template) trained with data.prompt_template=llama3 renders, stops and exports
    exactly as Llama-3-Instruct's own template does."""
    base = llama3_base_tokenizer()
    assert not base.chat_template
    shipped = PromptTemplate.from_config("llama3", base, conversations=True)
    instruct = llama3_base_tokenizer()
    instruct.chat_template = LLAMA3_JINJA
    conv = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "What is 2+2?"},
    ]
    assert shipped.render(base, conv, True) == instruct.apply_chat_template(
        conv, tokenize=False, add_generation_prompt=True
    )
    eot = base.convert_tokens_to_ids("<|eot_id|>")
    assert shipped.end_of_turn_id(base) == eot and eot in shipped.stop_token_ids
    assert gguf.chat_style(base, shipped) == "llama3"
    vocab = gguf.read_vocab(base, shipped, 300)
    assert vocab.eos_id == vocab.eot_id == eot and vocab.chat_template == shipped.chat_template
