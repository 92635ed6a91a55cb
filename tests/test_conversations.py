"""Conversation data: the formats (Alpaca, OpenAI messages, ShareGPT) and data.columns, the turn-by-turn mask
for every shipped template and SmolLM2's own, truncation at turn boundaries, and the report."""

import json
import logging

import pytest

from ftkit.config import DataCfg, load_config
from ftkit.data import clean_records, encode_rows, load_records
from ftkit.errors import UserError
from ftkit.prompts import IGNORE_INDEX, PromptTemplate

TURNS = [
    ("user", "What is 2 plus 3?"),
    ("assistant", "5"),
    ("user", "Double it"),
    ("assistant", "It is 10"),
    ("user", "Now subtract 4 from that"),
    ("assistant", "That leaves 6"),
]


def messages(system: str | None = None) -> list[dict]:
    head = [{"role": "system", "content": system}] if system else []
    return head + [{"role": r, "content": c} for r, c in TURNS]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def clean_file(path, **data):
    d = DataCfg(path=str(path), **data)
    records, _ = load_records(d)
    return clean_records(records, d, str(path))


@pytest.fixture(scope="module")
def tok(embedded_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_model)


@pytest.fixture(scope="module")
def llama3_tok(embedded_model):
    """SmolLM2's tokenizer with Llama-3's header and end-of-turn tokens added, standing in for the Llama-3
    base tokenizer (which has them, reserved, and no chat template) without a download."""
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(embedded_model)
    t.add_special_tokens(
        {"additional_special_tokens": ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]}
    )
    t.bos_token = "<|begin_of_text|>"
    t.chat_template = None
    return t


# -- formats ---------------------------------------------------------------------------------------
def test_auto_detects_each_format_and_says_so(tmp_path, caplog):
    m = write_jsonl(tmp_path / "m.jsonl", [{"messages": messages("Be brief")}])
    sg = write_jsonl(
        tmp_path / "s.jsonl",
        [{"system": "Be brief", "conversations": [{"from": f, "value": c} for f, (_, c) in zip("hg" * 3, TURNS)]}],
    )
    sg.write_text(sg.read_text().replace('"h"', '"human"').replace('"g"', '"gpt"'))
    a = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Add", "input": "2 and 3", "output": "5"}])
    with caplog.at_level(logging.INFO, logger="ftkit"):
        rows_m, st_m = clean_file(m)
        rows_s, st_s = clean_file(sg)
        rows_a, st_a = clean_file(a)
    assert (st_m.format, st_s.format, st_a.format) == ("messages", "sharegpt", "alpaca")
    assert "reading" in caplog.text and "as sharegpt rows" in caplog.text
    # The two chat formats read to the same conversation.
    assert rows_m[0]["messages"] == rows_s[0]["messages"] == messages("Be brief")
    assert rows_a[0]["instruction"] == "Add"


@pytest.mark.parametrize("user, assistant", [("user", "assistant"), ("human", "bot"), ("human", "model")])
def test_sharegpt_role_aliases(tmp_path, user, assistant):
    conv = [{"from": user, "value": "Hi"}, {"from": assistant, "value": "Hello"}]
    rows, _ = clean_file(write_jsonl(tmp_path / "s.jsonl", [{"conversations": conv}]), format="sharegpt")
    assert [m["role"] for m in rows[0]["messages"]] == ["user", "assistant"]


def test_column_mapping_renames_fields(tmp_path):
    m = write_jsonl(tmp_path / "m.jsonl", [{"dialog": messages(), "id": 7}])
    rows, st = clean_file(m, columns={"messages": "dialog"})
    assert st.format == "messages" and rows[0]["messages"] == messages() and rows[0]["id"] == 7
    a = write_jsonl(tmp_path / "a.jsonl", [{"question": "Capital of France?", "answer": "Paris"}])
    rows, st = clean_file(a, columns={"instruction": "question", "output": "answer"})
    assert st.format == "alpaca" and (rows[0]["instruction"], rows[0]["output"]) == ("Capital of France?", "Paris")


@pytest.mark.parametrize(
    "row, match",
    [
        ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, "line 2 turn 2 is user"),
        ({"messages": [{"role": "function", "content": "a"}]}, "line 2 turn 1 has an unknown role 'function'"),
        ({"messages": [{"role": "tool", "content": "a"}]}, "line 2 turn 1 is tool where user was expected"),
        (
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": " "}]},
            "line 2 has an empty assistant turn",
        ),
        ({"messages": [{"role": "assistant", "content": "a"}]}, "turn 1 is assistant where user was expected"),
        ({"instruction": "a", "output": "b"}, "line 2 is an Alpaca row"),
        ({"messages": [{"role": "user", "content": 5}]}, "has no text"),
    ],
)
def test_bad_conversations_name_the_line(tmp_path, row, match):
    p = write_jsonl(tmp_path / "m.jsonl", [{"messages": messages()}, row])
    with pytest.raises(UserError, match=match):
        clean_file(p)


def test_a_messages_row_in_an_alpaca_file(tmp_path):
    p = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "a", "output": "b"}, {"messages": messages()}])
    with pytest.raises(UserError, match="line 2 is a messages row in a file read as Alpaca"):
        clean_file(p)


def test_a_mapping_to_a_missing_field(tmp_path):
    p = write_jsonl(tmp_path / "m.jsonl", [{"messages": messages()}])
    with pytest.raises(UserError, match="line 1 has no 'dialog' field, which data.columns maps to messages"):
        clean_file(p, format="messages", columns={"messages": "dialog"})


def test_config_checks_columns_and_template_names():
    with pytest.raises(UserError, match="did you mean 'instruction'"):
        load_config(None, ["data.columns={instrution: q}"])
    with pytest.raises(UserError, match="did you mean 'llama3'"):
        load_config(None, ["data.prompt_template=lama3"])
    cfg = load_config(None, ["data.columns={messages: dialog}", "data.format=messages", "data.prompt_template=x.jinja"])
    assert cfg.data.columns == {"messages": "dialog"} and cfg.data.prompt_template == "x.jinja"


# -- the mask --------------------------------------------------------------------------------------
def eot_text(tok, t: PromptTemplate) -> str:
    return tok.decode([t.end_of_turn_id(tok)])


@pytest.mark.parametrize("name", ["chat", "chatml", "alpaca", "llama3"])
@pytest.mark.parametrize("system", [None, "You answer in few words"])
def test_trained_tokens_are_exactly_the_assistant_turns(tok, llama3_tok, name, system):
    tk = llama3_tok if name == "llama3" else tok
    t = PromptTemplate.from_config(name, tk, conversations=True)
    row = {"messages": messages(system)}
    (enc,) = [encode_rows([row], t, tk, DataCfg(max_length=512), "x")]
    ids, labels = enc.rows[0]["input_ids"], enc.rows[0]["labels"]
    trained = [i for i, lbl in zip(ids, labels) if lbl != IGNORE_INDEX]
    eot = eot_text(tk, t)
    assert tk.decode(trained) == "".join(c + eot for r, c in TURNS if r == "assistant")
    # The masked tokens hold every other turn, and the whole row is the template's own rendering.
    full = t.render(tk, messages(system), False)
    assert tk.decode(ids) == full.rstrip()
    assert t.end_of_turn_id(tk) in t.stop_token_ids


def test_llama3_renders_the_instruct_format_and_stops_at_eot(llama3_tok):
    t = PromptTemplate.from_config("llama3", llama3_tok, conversations=True)
    text = t.render(llama3_tok, messages()[:2], False)
    assert text == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhat is 2 plus 3?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n5<|eot_id|>"
    )
    assert llama3_tok.convert_tokens_to_ids("<|eot_id|>") in t.stop_token_ids
    # A single-turn Alpaca row through the same template trains the same way.
    ids, labels, status = t.encode(llama3_tok, "What is 2 plus 3?", None, "5", 128)
    assert status == "ok" and llama3_tok.decode([i for i, x in zip(ids, labels) if x != IGNORE_INDEX]) == "5<|eot_id|>"


def test_a_template_needs_its_markers_as_tokens(tok):
    with pytest.raises(UserError, match="<|eot_id|>"):
        PromptTemplate.from_config("llama3", tok, conversations=True)


def test_a_turn_marked_train_false_is_masked(tok):
    msgs = messages()
    msgs[3]["train"] = False
    t = PromptTemplate.from_config("chatml", tok, conversations=True)
    enc = encode_rows([{"messages": msgs}], t, tok, DataCfg(), "x")
    trained = [i for i, x in zip(enc.rows[0]["input_ids"], enc.rows[0]["labels"]) if x != IGNORE_INDEX]
    assert tok.decode(trained) == "5<|im_end|>That leaves 6<|im_end|>"


def test_a_jinja_file_template_that_cannot_render_a_system_turn(tok, tmp_path):
    p = tmp_path / "t.jinja"
    p.write_text(
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    t = PromptTemplate.from_config(str(p), tok, conversations=True)
    assert t.chat_template == p.read_text() and t.name == str(p)
    assert encode_rows([{"messages": messages()}], t, tok, DataCfg(), "x").rows
    with pytest.raises(
        UserError, match="starts .What is 2 plus 3.*cannot render a system/user conversation .System role not supported"
    ):
        encode_rows([{"messages": messages("Be brief")}], t, tok, DataCfg(), "x")


def test_long_conversations_are_cut_after_a_whole_turn(tok):
    t = PromptTemplate.from_config("chatml", tok, conversations=True)
    full = encode_rows([{"messages": messages()}], t, tok, DataCfg(max_length=512), "x").rows[0]["input_ids"]
    enc = encode_rows([{"messages": messages()}], t, tok, DataCfg(max_length=len(full) - 3), "x")
    assert enc.truncated_at_turn == 1 and enc.dropped_too_long == 0
    ids, labels = enc.rows[0]["input_ids"], enc.rows[0]["labels"]
    assert tok.decode([i for i, x in zip(ids, labels) if x != IGNORE_INDEX]) == "5<|im_end|>It is 10<|im_end|>"
    with pytest.raises(UserError, match="conversation is longer than data.max_length"):
        encode_rows([{"messages": messages()}], t, tok, DataCfg(max_length=len(full) - 3, too_long="fail"), "x")
    # Not even the first turn fits: dropped by default, cut inside the turn with too_long=truncate.
    long_first = messages()
    long_first[1]["content"] = "word " * 40 + "end"
    enc = encode_rows([{"messages": long_first}], t, tok, DataCfg(max_length=30), "x")
    assert enc.dropped_too_long == 1 and not enc.rows
    enc = encode_rows([{"messages": long_first}], t, tok, DataCfg(max_length=30, too_long="truncate"), "x")
    assert enc.truncated == 1 and len(enc.rows[0]["input_ids"]) == 30
    assert tok.decode([i for i, x in zip(enc.rows[0]["input_ids"], enc.rows[0]["labels"]) if x != IGNORE_INDEX])[
        :9
    ] == ("word word")


def test_conversations_without_a_trained_turn_are_counted_and_dropped(tok):
    t = PromptTemplate.from_config("chatml", tok, conversations=True)
    rows = [
        {"messages": messages()},
        {"messages": [{"role": "user", "content": "Hi"}]},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo", "train": False}]},
    ]
    enc = encode_rows(rows, t, tok, DataCfg(), "x")
    assert enc.untrainable == 2 and len(enc.rows) == 1


def test_dataset_report_for_conversations(tmp_path, tiny_llama):
    from helpers import run_script, tiny_overrides

    rows = [{"messages": messages("Be brief" if k % 2 else None)} for k in range(10)]
    for k, r in enumerate(rows):
        r["messages"][0 if k % 2 == 0 else 1]["content"] += f" (variant {k})"
    rows.append({"messages": [{"role": "user", "content": "Anyone there?"}]})
    data = write_jsonl(tmp_path / "conv.jsonl", rows)
    out = tmp_path / "run"
    over = tiny_overrides(tiny_llama, data, out, **{"data.eval_size": 2, "data.prompt_template": "chatml"})
    r = run_script("dataset.py", "--config", "configs/demo.yaml", *over)
    assert r.returncode == 0, r.stderr
    rep = json.loads((out / "dataset_report.json").read_text())
    assert rep["format"] == "messages" and rep["rows_in_file"] == 11 and rep["untrainable_dropped"] == 1
    c = rep["conversations"]
    assert c["turns_per_row"]["max"] == 6 and c["with_system_turn"] >= 1
    assert set(c["tokens_per_role"]) == {"system", "user", "assistant_trained", "markup"}
    assert 0 < rep["trained_share"] < 1
    ex = rep["examples"][0]["trained_on"]
    assert "It is 10<|im_end|>" in ex and "That leaves 6<|im_end|>" in ex and "Double it" not in ex
    assert "reading" in r.stderr and "tokens by role" in r.stdout


def test_conversation_chain_end_to_end(tmp_path, tiny_llama):
    """dataset -> finetune -> merge -> inference on a ShareGPT file of multi-turn conversations, on the tiny
    model: the run's files, the frozen template, and a training loss that falls."""
    from helpers import run_script, tiny_overrides

    from ftkit.templates import TEMPLATES

    words = ["apple", "river", "stone", "cloud", "green", "music", "table", "light", "paper", "house", "bread", "chair"]
    rows = [
        {
            "system": "Repeat words",
            "conversations": [
                {"from": "human", "value": f"Say {w}"},
                {"from": "gpt", "value": f"{w} {w}"},
                {"from": "human", "value": "Once more"},
                {"from": "gpt", "value": f"{w} {w}"},
            ],
        }
        for w in words * 2
    ]
    for k, r in enumerate(rows[len(words) :]):
        r["conversations"][2]["value"] = f"Once more, please ({k})"
    data = write_jsonl(tmp_path / "chats.jsonl", rows)
    run = tmp_path / "runs" / "conv"
    over = tiny_overrides(
        tiny_llama,
        data,
        run,
        **{
            "data.prompt_template": "chatml",
            "data.eval_size": 2,
            "train.max_steps": 10,
            "train.learning_rate": 1e-2,
            "train.warmup_steps": 0,
            "train.eval_steps": "null",
            "train.save_steps": 100,
            "paths.latest": str(tmp_path / "runs" / "latest"),
        },
    )
    args = ["--config", "configs/demo.yaml", *over]
    r = run_script("dataset.py", *args)
    assert r.returncode == 0, r.stderr
    assert "as sharegpt rows" in r.stderr
    r = run_script("finetune.py", *args)
    assert r.returncode == 0, r.stderr
    for f in ("prompt_template.json", "dataset_report.json", "eval_rows.jsonl", "adapter/adapter_model.safetensors"):
        assert (run / f).is_file(), f
    tpl = json.loads((run / "prompt_template.json").read_text())
    assert tpl["name"] == "chatml" and tpl["chat_template"] == TEMPLATES["chatml"].jinja and tpl["kind"] == "chat"
    assert json.loads((run / "dataset_report.json").read_text())["conversations"]["turns_per_row"]["max"] == 4
    held_out = [json.loads(line) for line in (run / "eval_rows.jsonl").read_text().splitlines()]
    assert len(held_out) == 2 and held_out[0]["messages"][0] == {"role": "system", "content": "Repeat words"}
    losses = [
        json.loads(line)["loss"] for line in (run / "train_log.jsonl").read_text().splitlines() if '"loss"' in line
    ]
    # A random 3M model starts at ln(vocab) ~ 10.8 and LoRA moves it slowly (10.85 -> ~10.4 here): a fall of a
    # quarter nat over 10 steps says it learns from the conversations, where a non-learning run stays flat.
    assert len(losses) == 10 and sum(losses[-3:]) / 3 < losses[0] - 0.25, losses
    r = run_script("merge_adapter.py", "--config", str(run / "config.yaml"))
    assert r.returncode == 0, r.stderr
    assert (run / "merged" / "merge_check.json").is_file()
    r = run_script("inference.py", "--config", str(run / "config.yaml"), "--prompt", "Say stone")
    assert r.returncode == 0, r.stderr
    assert "answering with" in r.stderr and str(run / "merged") in r.stderr
    # evaluate.py on the held-out conversations: the last assistant turn, answered from the turns before it.
    r = run_script("evaluate.py", "--config", str(run / "config.yaml"))
    assert r.returncode == 0, r.stderr
    rep = json.loads((run / "eval" / "eval_report.json").read_text())
    assert [x["instruction"] for x in rep["rows"]] == [c["messages"][-2]["content"] for c in held_out]
    assert [x["reference"] for x in rep["rows"]] == [c["messages"][-1]["content"] for c in held_out]
    for name in ("base", "fine_tuned"):
        assert 0 < rep["overall"][name]["eval_loss"] < 20 and rep["overall"][name]["rouge_l"] is not None


# -- several datasets in one run -------------------------------------------------------------------
def mix_files(tmp_path):
    alpaca = tmp_path / "qa.json"
    alpaca.write_text(json.dumps([{"question": f"Question {i}?", "answer": f"Answer {i}"} for i in range(10)]))
    chats = write_jsonl(
        tmp_path / "chats.jsonl", [{"messages": messages(f"System {i}")} for i in range(8)]
    )  # 8 distinct (system turn differs)
    share = write_jsonl(
        tmp_path / "share.jsonl",
        [
            {"conversations": [{"from": "human", "value": f"Hi {i}"}, {"from": "gpt", "value": f"Yo {i}"}]}
            for i in range(8)
        ],
    )
    return alpaca, chats, share


def test_several_sources_each_with_format_columns_cap_and_weight(tmp_path):
    from ftkit.data import load_clean_split
    from ftkit.paths import local_data_hash

    alpaca, chats, share = mix_files(tmp_path)
    cfg = load_config(
        None,
        [
            f"data.path=[{{path: {alpaca}, columns: {{instruction: question, output: answer}}, max_rows: 6}}, "
            f"{{path: {chats}, weight: 2}}, {{path: {share}, format: sharegpt, weight: 0.5}}]",
            "data.eval_size=4",
        ],
    )
    train, held, st, digest = load_clean_split(cfg.data)
    assert st.format == "mixed" and st.rows_in == 26 and st.kept == 6 + 8 + 8
    mix = {m["path"]: m for m in st.mix}
    assert [mix[str(p)]["kept"] for p in (alpaca, chats, share)] == [6, 8, 8]
    assert sum(m["eval_rows"] for m in st.mix) == 4 and len(held) == 4
    n_held = {str(p): mix[str(p)]["eval_rows"] for p in (alpaca, chats, share)}
    assert mix[str(alpaca)]["train_rows"] == 6 - n_held[str(alpaca)]
    assert mix[str(chats)]["train_rows"] == 2 * (8 - n_held[str(chats)])
    assert mix[str(share)]["train_rows"] == round(0.5 * (8 - n_held[str(share)]))
    assert len(train) == sum(m["train_rows"] for m in st.mix)
    assert abs(sum(m["share_of_train"] for m in st.mix) - 1) < 1e-3
    # Alpaca rows became single-turn conversations; nothing held out is also trained on.
    assert all("messages" in r for r in train + held)
    assert {"role": "user", "content": "Question 0?"} in [m for r in train + held for m in r["messages"]]
    assert not {json.dumps(r, sort_keys=True) for r in held} & {json.dumps(r, sort_keys=True) for r in train}
    # --resume compares this hash with the files now.
    assert digest == local_data_hash(cfg.data.path)
    assert load_clean_split(cfg.data)[0] == train  # seeded


def test_a_mix_in_the_dataset_report(tmp_path, tiny_llama):
    from helpers import run_script, tiny_overrides

    alpaca, chats, share = mix_files(tmp_path)
    out = tmp_path / "run"
    mix = (
        f"[{{path: {alpaca}, columns: {{instruction: question, output: answer}}}}, {{path: {chats}, weight: 2}}, "
        f"{share}]"
    )
    over = tiny_overrides(tiny_llama, alpaca, out, **{"data.path": mix, "data.prompt_template": "chatml"})
    r = run_script("dataset.py", "--config", "configs/demo.yaml", *over)
    assert r.returncode == 0, r.stderr
    rep = json.loads((out / "dataset_report.json").read_text())
    assert rep["format"] == "mixed" and [m["format"] for m in rep["mix"]] == ["alpaca", "messages", "sharegpt"]
    assert rep["train_rows"] == sum(m["train_rows"] for m in rep["mix"]) and "mix: " in r.stdout
    bad = tiny_overrides(tiny_llama, alpaca, out, **{"data.path": f"[{{path: {chats}, wieght: 2}}]"})
    r = run_script("dataset.py", "--config", "configs/demo.yaml", *bad)
    assert r.returncode == 2 and "did you mean 'weight'" in r.stderr


def test_a_template_without_an_end_marker_trains_eos(tok, tmp_path):
    p = tmp_path / "bare.jinja"
    p.write_text(
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    t = PromptTemplate.from_config(str(p), tok, conversations=True)
    enc = encode_rows([{"messages": messages()}], t, tok, DataCfg(), "x")
    trained = [i for i, x in zip(enc.rows[0]["input_ids"], enc.rows[0]["labels"]) if x != IGNORE_INDEX]
    assert tok.decode(trained) == "".join(c + tok.eos_token for r, c in TURNS if r == "assistant")
    assert t.end_of_turn_id(tok) == tok.eos_token_id


def test_dataset_trains_tool_calls_and_masks_tool_outputs(tmp_path, tiny_llama):
    """dataset.py on messages rows with tool definitions, calls and outputs, under a .jinja template that renders
    tools: the report's example trains the call and the answer, not the tool's output, and counts tool tokens."""
    from helpers import TOOL_TEMPLATE, WEATHER, run_script, tiny_overrides

    rows = []
    for k in range(8):
        call = {"function": {"name": "get_weather", "arguments": json.dumps({"city": f"Paris {k}"})}}
        rows.append(
            {
                "tools": [WEATHER],
                "messages": [
                    {"role": "user", "content": f"Weather in Paris {k}?"},
                    {"role": "assistant", "content": "", "tool_calls": [call]},
                    {"role": "tool", "content": f"temperature={k};sky=clear"},
                    {"role": "assistant", "content": f"It is {k} C and clear."},
                ],
            }
        )
    (tmp_path / "tools.jinja").write_text(TOOL_TEMPLATE)
    data = write_jsonl(tmp_path / "conv.jsonl", rows)
    out = tmp_path / "run"
    over = tiny_overrides(
        tiny_llama, data, out, **{"data.eval_size": 2, "data.prompt_template": tmp_path / "tools.jinja"}
    )
    r = run_script("dataset.py", "--config", "configs/demo.yaml", *over)
    assert r.returncode == 0, r.stderr
    rep = json.loads((out / "dataset_report.json").read_text())
    assert rep["conversations"]["tokens_per_role"]["tool"] > 0
    ex = rep["examples"][0]["trained_on"]
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris' in ex and "C and clear.<|im_end|>" in ex
    assert "temperature=" not in ex and "Weather in" not in ex
