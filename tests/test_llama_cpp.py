"""Every GGUF export checked where it runs: inside llama.cpp (llama-cpp-python, built by `make llama-cpp`, which
`make test-all` runs first, so none of this is skipped there; the fast tier, `make test`, leaves it out).

The subject is the demo as `make demo` leaves it: configs/demo.yaml trained for its 100 steps on the embedded
SmolLM2-135M-Instruct (~5 min on 2 cores), merged, then exported as f16, q8_0, q4_0 and Q4_K_M, the base model as
f16 and the adapter alone as a LoRA GGUF. Agreement with transformers is on the merged model in float32.

Measured here (2-core CPU), for the thresholds below: see the 'quality' report the test prints and
benchmarks/results/gguf_quality_cpu.json (benchmarks/gguf_quality.py) for the full table.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, free_port, run_script, serving

from ftkit.config import load_config
from ftkit.jsonl import read_jsonl
from ftkit.paths import RunDir
from ftkit.prompts import PromptTemplate
from ftkit.scoring import is_verifiable, unseen

# make test-all builds llama.cpp first; make test (the fast tier) leaves this file out.
pytestmark = pytest.mark.llamacpp
llama_cpp = pytest.importorskip("llama_cpp", reason="llama.cpp is not installed: run `make llama-cpp`")

from ftkit.llamacpp import export_quality, greedy_ids, load  # noqa: E402

TYPES = ("f16", "q8_0", "q4_0", "q4_k_m")
FIXED = ["Name the capital of France.", "Sort the numbers: 9, 2, 5.", "Write the word 'cat' in capital letters."]


@pytest.fixture(scope="module")
def demo(tmp_path_factory, embedded_model) -> dict:
    """The trained, merged demo run and its exports: {'run': Path, 'f16': Path, ..., 'base': Path, 'lora': Path}."""
    tmp = tmp_path_factory.mktemp("llama-demo")
    run = tmp / "demo"
    common = [
        "--config",
        str(REPO / "configs" / "demo.yaml"),
        f"paths.output_dir={run}",
        f"paths.latest={tmp / 'latest'}",
    ]
    for script in ("finetune.py", "merge_adapter.py"):
        r = run_script(script, *common, timeout=1800)
        assert r.returncode == 0, r.stderr[-4000:]
    out = {"run": run}
    for t in TYPES:
        r = run_script("export_gguf.py", "--config", str(run / "config.yaml"), "--type", t.upper())
        assert r.returncode == 0, r.stderr[-4000:]
    r = run_script("export_gguf.py", "--config", str(run / "config.yaml"), "--adapter")
    assert r.returncode == 0, r.stderr[-4000:]
    for t in ("Q4_K_M", "F16"):  # the base for the adapter GGUF; F16 last, so its Modelfile is the one left
        r = run_script("export_gguf.py", "--config", str(run / "config.yaml"), "--base", "--type", t)
        assert r.returncode == 0, r.stderr[-4000:]
    for f in (run / "export").glob("*.gguf"):
        key = "lora" if f.stem.endswith("-LoRA") else f.stem.rsplit("-", 1)[-1].lower()
        out[key] = f
    out["base"] = run / "export" / "base" / "SmolLM2-135M-Instruct-F16.gguf"
    out["base_q4_k_m"] = run / "export" / "base" / "SmolLM2-135M-Instruct-Q4_K_M.gguf"
    return out


def tokenizer_and_template(run: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(run / "merged"), PromptTemplate.load(run / "prompt_template.json")


def held_out(run: Path) -> list[dict]:
    return [row for _, row in read_jsonl(RunDir(run).eval_rows, "held-out rows", "")]


def fresh_demo_rows(tmp: Path) -> list[dict]:
    """Verifiable demo tasks from another generator seed that the demo never trained or held out on: more rows make
    the 90% bar a measurement rather than a coin toss (114 held-out rows move ~4 points on one answer in three)."""
    out = tmp / "fresh.jsonl"
    cmd = [sys.executable, str(REPO / "data" / "generate_demo_data.py"), "--seed", "7", "--per-family", "40"]
    subprocess.run([*cmd, "--out", str(out)], check=True, capture_output=True)
    shipped = [r for _, r in read_jsonl(REPO / "data" / "demo_tasks.jsonl", "demo data", "")]
    return [r for r in unseen([r for _, r in read_jsonl(out, "fresh rows", "")], shipped) if is_verifiable(r)]


def prompts(run: Path, n: int = 5) -> list[list[int]]:
    tok, template = tokenizer_and_template(run)
    rows = held_out(run)[:n]
    return [template.prompt_ids(tok, r["instruction"], r.get("input") or None) for r in rows] + [
        template.prompt_ids(tok, q) for q in FIXED
    ]


def test_names_and_metadata_follow_llama_cpp(demo):
    import gguf

    run = demo["run"]
    names = sorted(p.name for p in (run / "export").iterdir())
    stem = f"SmolLM2-135M-Instruct-{run.name}"
    assert names == sorted([f"{stem}-{t.upper()}.gguf" for t in TYPES] + [f"{stem}-F16-LoRA.gguf", "Modelfile", "base"])
    assert sorted(p.name for p in (run / "export" / "base").iterdir()) == sorted(
        ["SmolLM2-135M-Instruct-F16.gguf", "SmolLM2-135M-Instruct-Q4_K_M.gguf", "Modelfile"]
    )
    modelfile = (run / "export" / "base" / "Modelfile").read_text().splitlines()
    assert "FROM ./SmolLM2-135M-Instruct-F16.gguf" in modelfile and f"ADAPTER ../{stem}-F16-LoRA.gguf" in modelfile
    field = lambda r, k: r.fields[k].contents()  # noqa: E731
    model = gguf.GGUFReader(demo["q4_k_m"])
    assert field(model, "general.type") == "model" and field(model, "general.architecture") == "llama"
    assert field(model, "general.basename") == "SmolLM2" and field(model, "general.size_label") == "135M"
    assert field(model, "general.finetune") == f"Instruct-{run.name}"
    assert field(model, "general.base_model.0.name") == "SmolLM2-135M-Instruct"
    assert field(model, "general.file_type") == gguf.LlamaFileType.MOSTLY_Q4_K_M
    kinds = {t.tensor_type.name for t in model.tensors}
    assert {"Q4_K", "Q6_K"} <= kinds, kinds  # llama.cpp's own mix, not a relabelled pure-Python file
    q40 = gguf.GGUFReader(demo["q4_0"])  # GPTQ-rounded, and says so; still plain q4_0 blocks (Q8_0: the tied head)
    assert field(q40, "quantize.gptq.rows") == 256 and field(q40, "quantize.gptq.dataset") == "data/demo_tasks.jsonl"
    assert {t.tensor_type.name for t in q40.tensors} == {"Q4_0", "Q8_0", "F32"}
    base = gguf.GGUFReader(demo["base_q4_k_m"])
    assert field(base, "general.finetune") == "Instruct"  # the base's own name part, not the run's
    assert field(base, "general.file_type") == gguf.LlamaFileType.MOSTLY_Q4_K_M
    # llama.cpp takes the chat prompt from the model file, so the base under the adapter carries the run's template
    assert field(base, "tokenizer.chat_template") == field(model, "tokenizer.chat_template")
    lora = gguf.GGUFReader(demo["lora"])
    assert field(lora, "general.type") == "adapter" and field(lora, "adapter.type") == "lora"
    assert field(lora, "adapter.lora.alpha") == 32.0
    assert len(lora.tensors) == 30 * 7 * 2  # 30 blocks x 7 projections x (lora_a, lora_b)
    assert demo["lora"].stat().st_size < 0.15 * demo["f16"].stat().st_size


def test_f16_and_q8_0_greedy_tokens_match_transformers(demo):
    """The first 16 greedy tokens of fixed and held-out prompts: llama.cpp on the export == transformers on the
    merged model (float32)."""
    import torch
    from transformers import AutoModelForCausalLM

    run = demo["run"]
    tok, _ = tokenizer_and_template(run)
    model = AutoModelForCausalLM.from_pretrained(run / "merged", dtype=torch.float32).eval()
    want = []
    for ids in prompts(run):
        g = model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False, pad_token_id=tok.pad_token_id)
        new = g[0, len(ids) :].tolist()
        # merge_adapter.py writes one stop id as an int (SmolLM2's <|im_end|>, its EOS as transformers >= 5.24
        # converts it) and several as a list (<|im_end|> and the <|im_start|> 5.17 took for EOS)
        eos = model.generation_config.eos_token_id
        stops = {tok.eos_token_id, *(eos if isinstance(eos, list) else [eos])} - {None}
        cut = next((i for i, t in enumerate(new) if t in stops), len(new))
        want.append(new[:cut])
    del model
    for t in ("f16", "q8_0"):
        llm = load(demo[t])
        got = [greedy_ids(llm, ids, 16) for ids in prompts(run)]
        llm.close()
        assert got == want, (t, [tok.decode(x) for x in got], [tok.decode(x) for x in want])
    assert all(want) and sum(len(w) for w in want) >= 3 * len(want), want  # answers, not immediate stops


def test_low_bit_exports_keep_the_demo_answers(demo, tmp_path):
    """q8_0, Q4_K_M, q4_0 (GPTQ-rounded) and the adapter over a Q4_K_M base against f16 inside llama.cpp: top-1
    agreement, perplexity of the reference answers and exact match of greedy answers, printed as a table, on the
    held-out rows plus fresh demo tasks (326 verifiable rows: on 114 alone one answer moves the share ~1.3 points).

    Measured on this run (2-core CPU, benchmarks/gguf_quality.py), exact match as a share of f16's 65.6%: q8_0
    99.5%, Q4_K_M 92.5% (ppl 1.347 vs 1.299, agreement 96.7%), GPTQ q4_0 93.5% (1.331, 97.9%; round to nearest
    was 71.5%), the adapter over the Q4_K_M base 97.7% (1.324, 97.2%)."""
    run = demo["run"]
    tok, template = tokenizer_and_template(run)
    cfg = load_config(run / "config.yaml")
    rows = held_out(run) + fresh_demo_rows(tmp_path)
    files = {t: demo[t] for t in ("f16", "q8_0", "q4_k_m", "q4_0")}
    files["q4_k_m+lora"] = (demo["base_q4_k_m"], demo["lora"])
    report = export_quality(files, rows, template, tok, cfg.data.max_length, cfg.inference.max_new_tokens)
    table = {t: {k: v for k, v in r.items() if k != "answers"} for t, r in report.items()}
    print("quality", json.dumps(table, indent=1))
    f16, q8, q4km, q40 = (report[t] for t in ("f16", "q8_0", "q4_k_m", "q4_0"))
    split = report["q4_k_m+lora"]  # the same 4-bit base weights, the LoRA delta unrounded: closer to f16
    assert f16["verifiable_rows"] >= 300 and f16["exact_match"] >= 0.55, table  # trained: ~2% before training
    assert q8["exact_match"] >= 0.95 * f16["exact_match"] and q8["top1_agreement"] >= 0.98, table
    assert q8["perplexity"] <= 1.02 * f16["perplexity"], table
    for r in (q4km, q40, split):
        assert r["exact_match"] >= 0.9 * f16["exact_match"], table
        assert r["top1_agreement"] >= 0.93 and r["perplexity"] <= 1.08 * f16["perplexity"], table
    assert f16["perplexity"] < split["perplexity"] < q4km["perplexity"], table
    assert split["exact_match"] >= q4km["exact_match"], table


def test_llama_cpp_renders_the_training_chat_prompt_and_stops_at_end_of_turn(demo):
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    run = demo["run"]
    tok, template = tokenizer_and_template(run)
    llm = load(demo["f16"], n_ctx=1024)
    assert llm.chat_format == "chat_template.default"  # the GGUF's own template, not a built-in guess
    conv = [
        {"role": "user", "content": "My name is Ada. Remember it."},
        {"role": "assistant", "content": "Nice to meet you, Ada."},
        {"role": "user", "content": 'Repeat "sun" two times with a space between each.'},
    ]
    eos = llm._model.token_get_text(llm.token_eos())
    fmt = Jinja2ChatFormatter(llm.metadata["tokenizer.chat_template"], eos_token=eos, bos_token="")(messages=conv)
    assert fmt.prompt == template.render(tok, conv, generation_prompt=True)
    # the server tokenizes the rendered text itself: its ids must be training's ids
    assert llm.tokenize(fmt.prompt.encode(), add_bos=False, special=True) == template.messages_prompt_ids(tok, conv)
    end = template.end_of_turn_id(tok)
    assert llm.token_eos() == end and eos == "<|im_end|>"
    assert llama_cpp.llama_vocab_is_eog(llama_cpp.llama_model_get_vocab(llm.model), end)
    r = llm.create_chat_completion(conv, temperature=0.0, max_tokens=64)
    llm.close()
    choice = r["choices"][0]
    # transformers on the merged model, stopping at the training end-of-turn token, says what the answer is
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(run / "merged", dtype=torch.float32).eval()
    ids = template.messages_prompt_ids(tok, conv)
    g = model.generate(torch.tensor([ids]), max_new_tokens=64, do_sample=False, eos_token_id=end, pad_token_id=end)
    new = g[0, len(ids) :].tolist()
    assert new[-1] == end, "transformers did not end its turn within 64 tokens"
    assert choice["finish_reason"] == "stop", choice
    assert choice["message"]["content"] == tok.decode(new[:-1]), (choice, tok.decode(new))
    assert "<|im_end|>" not in choice["message"]["content"]


def parted_at_near_ties(run: Path, ids: list[list[int]], got: list[list[int]], want: list[list[int]]) -> list:
    """Where two greedy answers to the same prompts part: (prompt, position, the float32 merged model's gap between
    the two tokens there). A stopped answer's next token is the end of turn."""
    import torch
    from transformers import AutoModelForCausalLM

    tok, template = tokenizer_and_template(run)
    end = template.end_of_turn_id(tok)
    model = AutoModelForCausalLM.from_pretrained(run / "merged", dtype=torch.float32).eval()
    out = []
    for n, (p, g, w) in enumerate(zip(ids, got, want)):
        if g == w:
            continue
        k = next((i for i, (a, b) in enumerate(zip(g, w)) if a != b), min(len(g), len(w)))
        a, b = (g + [end])[k], (w + [end])[k]
        with torch.no_grad():
            logits = model(torch.tensor([p + w[:k]])).logits[0, -1]
        out.append((n, k, abs(float(logits[a] - logits[b]))))
    return out


def test_adapter_gguf_over_base_answers_as_the_merged_export(demo):
    run = demo["run"]
    ids = prompts(run)
    merged = load(demo["f16"])
    want = [greedy_ids(merged, p, 16) for p in ids]
    merged.close()
    with_lora = load(demo["base"], lora=demo["lora"])
    got = [greedy_ids(with_lora, p, 16) for p in ids]
    with_lora.close()
    # The same answers, except that the adapter's product, rounded apart from the f16 base, may flip a near-tie
    # (two tokens within f16's rounding, 0.05, in the float32 merged model; one run had 'D' 29.384 vs 'd' 29.369):
    # the answers part there, at most one of the eight.
    parted = parted_at_near_ties(run, ids, got, want)
    assert len(parted) <= 1 and all(gap < 0.05 for _, _, gap in parted), (parted, got, want)
    base = load(demo["base"])
    plain = [greedy_ids(base, p, 16) for p in ids]
    base.close()
    assert plain != want  # the adapter changes the answers: the check above is not base == base


def test_server_round_trip_with_the_openai_client(demo):
    with serving("--config", str(demo["run"] / "config.yaml"), "--serve") as (client, models):
        name = models.data[0].id
        assert name == demo["run"].name
        msgs = [{"role": "user", "content": "Convert 62 liters to milliliters."}]
        reply = client.chat.completions.create(model=name, messages=msgs, temperature=0, max_tokens=24)
        text = reply.choices[0].message.content
        # no temperature: the run's inference settings (greedy) are the server's defaults
        stream = client.chat.completions.create(model=name, messages=msgs, max_tokens=24, stream=True)
        streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    # --serve alone serves the run's newest full-model export (the adapter GGUF is not one): here Q4_K_M
    newest = max((f for f in (demo["run"] / "export").glob("*.gguf") if f != demo["lora"]), key=os.path.getmtime)
    assert newest == demo["q4_k_m"]
    llm = load(newest, n_ctx=2048)
    direct = llm.create_chat_completion(msgs, temperature=0.0, max_tokens=24)["choices"][0]["message"]["content"]
    llm.close()
    assert text and text == streamed, (text, streamed)
    assert text == direct, (text, direct)


def test_a_port_in_use_is_one_line(tmp_path, demo):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = run_script("inference.py", "--serve", str(demo["f16"]), "--port", str(port), timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot listen on 127.0.0.1:") and "--port" in last, last


@pytest.mark.parametrize(
    "args, keyword",
    [
        (["--serve", "{lora}"], "is a GGUF adapter, not a model; pass it with --lora"),
        (["--serve", "{f16}", "--lora", "{f16}"], "is a GGUF model, not an adapter"),
        (["--serve", "{base_cut}"], "'{base_cut}'"),
        (["--serve", "{f16}", "--host", "no.such.host.invalid"], "is not an address"),
        (["--serve", "{f16}", "--lora", "{other_lora}"], "does not fit"),
    ],
    ids=["adapter-as-model", "model-as-adapter", "cut-short", "bad-host", "adapter-of-another-shape"],
)
def test_serving_the_wrong_file_is_one_line(tmp_path, demo, args, keyword):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(demo["f16"].read_bytes()[: demo["f16"].stat().st_size // 3])
    other = tmp_path / "other-lora.gguf"  # an adapter GGUF whose base is not SmolLM2-135M: shapes differ
    import gguf

    w = gguf.GGUFWriter(other, "llama")
    w.add_type("adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", 16.0)
    import numpy as np

    w.add_tensor("blk.0.attn_q.weight.lora_a", np.zeros((8, 64), dtype=np.float32))
    w.add_tensor("blk.0.attn_q.weight.lora_b", np.zeros((64, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    subst = {"lora": demo["lora"], "f16": demo["f16"], "base_cut": cut, "other_lora": other}
    before = {p: p.stat().st_mtime_ns for p in (demo["run"] / "export").iterdir()}
    r = run_script("inference.py", *[a.format(**subst) for a in args], "--port", str(free_port()), timeout=180)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and keyword.format(**subst) in last, last
    assert {p: p.stat().st_mtime_ns for p in (demo["run"] / "export").iterdir()} == before


@pytest.mark.parametrize("stage", ["writing the float copy", "llama.cpp quantizing"])
def test_ctrl_c_during_a_k_quant_export_leaves_nothing(tmp_path, embedded_model, monkeypatch, stage):
    """Ctrl+C (KeyboardInterrupt) while the float copy is written or while llama.cpp quantizes: no output file and
    no temporary file. Raised at a chosen point, so the test does not race the (fast) real export."""
    import export_gguf
    import ftkit.gguf

    real = ftkit.gguf.iter_tensor_data

    def interrupted_write(ckpt, plans, *rest):
        for i, item in enumerate(real(ckpt, plans, *rest)):
            if i == len(plans) // 2:
                raise KeyboardInterrupt
            yield item

    def interrupted_quantize(src, dst, *a, **k):
        assert src.is_file()  # the float copy is complete at this point
        dst.write_bytes(b"GGUF partial")  # llama.cpp had started writing
        raise KeyboardInterrupt

    if stage == "writing the float copy":
        monkeypatch.setattr(ftkit.gguf, "iter_tensor_data", interrupted_write)
    else:
        monkeypatch.setattr(export_gguf, "quantize", interrupted_quantize)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        export_gguf.main(load_config(None), None, "q4_k_m", out / "m.gguf", model_dir=embedded_model)
    assert sorted(p.name for p in out.iterdir()) == []


def test_adapter_gguf_carries_rslora_and_per_module_rank_and_alpha(tmp_path, tiny_llama):
    """llama.cpp scales every pair by alpha/rank; rsLoRA (alpha/sqrt(r)) and rank_pattern/alpha_pattern are folded
    into lora_b. Checked on logits: base GGUF + adapter GGUF in llama.cpp == PEFT's merged model exported."""
    import numpy as np
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import export_gguf
    from ftkit.gguf import export_names, plan_adapter, write_adapter_gguf

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    lcfg = LoraConfig(
        r=8,
        lora_alpha=16,
        use_rslora=True,
        rank_pattern={"v_proj": 4},
        alpha_pattern={"o_proj": 32},
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        init_lora_weights=False,  # random B: an adapter that changes the logits
    )
    peft_model = get_peft_model(model, lcfg)
    peft_model.save_pretrained(tmp_path / "adapter")
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(tmp_path / "merged")
    cfg = load_config(None)
    export_gguf.main(cfg, None, "f32", tmp_path / "m" / "merged.gguf", model_dir=tmp_path / "merged")
    export_gguf.main(cfg, None, "f32", tmp_path / "b" / "base.gguf", model_dir=tiny_llama)
    adapter_cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    ap = plan_adapter(tmp_path / "adapter", adapter_cfg, merged.config, "f32")
    folds = {p.gguf_name.split(".")[2]: round(p.scale, 4) for p in ap.plans if p.gguf_name.startswith("blk.0.")}
    # PEFT's scale / llama.cpp's alpha/r: rsLoRA sqrt(r); o_proj alpha 32 vs 16; v_proj r=4
    assert folds["attn_q"] == round(8**0.5, 4) and folds["attn_output"] == round(2 * 8**0.5, 4)
    assert folds["attn_v"] == round(4**0.5, 4), folds
    lora = tmp_path / "a" / "adapter.gguf"
    lora.parent.mkdir()
    write_adapter_gguf(ap, "f32", export_names(merged.config, 1_000_000, str(tiny_llama), "t"), lora)
    ids = list(range(5, 120, 7))

    def logits(path, lora=None):
        llm = load(path, lora=lora, n_ctx=256, logits_all=True)
        llm.eval(ids)
        out = np.array(llm.scores[: len(ids)])
        llm.close()
        return out

    want, got = logits(tmp_path / "m" / "merged.gguf"), logits(tmp_path / "b" / "base.gguf", lora)
    base = logits(tmp_path / "b" / "base.gguf")
    assert np.abs(got - want).max() < 1e-3 * max(1.0, np.abs(want).max()), np.abs(got - want).max()
    assert np.abs(base - want).max() > 100 * np.abs(got - want).max()  # the adapter matters
