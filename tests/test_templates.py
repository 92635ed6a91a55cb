"""ftkit/templates.py, the registry: every registered template renders one multi-turn conversation the same in all
three of its forms. The project's renderer (what training and inference use) and transformers' apply_chat_template
render its Jinja; the Modelfile that export writes gets its Ollama form, rendered as Ollama would (helpers.go_render);
training's turn pieces and stop tokens end each answer with its end-of-turn marker. In process, on a tokenizer made
here that has every registered marker."""

import pytest
from helpers import TOOL_TEMPLATE, WEATHER, go_render, parse_modelfile

from ftkit import gguf
from ftkit.config import load_config
from ftkit.prompts import PromptTemplate
from ftkit.templates import TEMPLATES, ChatTemplate

BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
SYSTEM = "Be brief."
CHAT = [
    {"role": "user", "content": "What is 2 plus 3?"},
    {"role": "assistant", "content": "5"},
    {"role": "user", "content": "Double it"},
    {"role": "assistant", "content": "It is 10"},
]


@pytest.fixture(scope="module")
def tok():
    """A byte-level BPE whose special tokens are every registered template's markers, with BOS and EOS apart from
    them (as Llama-3's base has) and BOS added by the tokenizer; no chat template of its own."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [BOS, EOS, *dict.fromkeys(t for entry in TEMPLATES.values() for t in entry.tokens)]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    bpe.train_from_iterator(
        [m["content"] for m in CHAT] + [SYSTEM, "### Instruction:\n### Response:\n"],
        trainers.BpeTrainer(
            vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    bpe.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=BOS, eos_token=EOS)


def ollama_values(messages: list[dict], modelfile_system: str) -> dict:
    """What Ollama hands a TEMPLATE for a chat request: the Modelfile's SYSTEM as a system turn when the request has
    none, .System the system turns' text, .Messages every turn (system ones included)."""
    if modelfile_system and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": modelfile_system}, *messages]
    return {
        "System": "\n\n".join(m["content"] for m in messages if m["role"] == "system"),
        "Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages],
    }


@pytest.mark.parametrize("system", [None, SYSTEM])
@pytest.mark.parametrize("name", TEMPLATES)
def test_every_template_renders_a_chat_alike_in_all_three_forms(tok, name, system):
    entry = TEMPLATES[name]
    chat = ([{"role": "system", "content": system}] if system else []) + CHAT
    t = PromptTemplate.from_config(name, tok, conversations=True)
    assert t.chat_template == entry.jinja and gguf.gguf_chat_template(t) == entry.jinja

    def jinja(messages, generation_prompt):
        return tok.apply_chat_template(
            messages, chat_template=entry.jinja, tokenize=False, add_generation_prompt=generation_prompt
        )

    # 1. The project's renderer is transformers', for a chat that ends with an answer and for the next prompt.
    full = jinja(chat, False)
    assert t.render(tok, chat, False) == full
    assert t.render(tok, chat[:-1], True) == jinja(chat[:-1], True)

    # 2. Training: the pieces put back together are the rendering, and what is trained is each answer followed by
    #    the entry's end-of-turn marker, which is also where generation stops.
    end = entry.end_of_turn_text(tok.eos_token)
    pieces = t.pieces(tok, chat)
    joined = "".join(p.text for p in pieces)
    assert full.startswith(joined) and not full[len(joined) :].strip()
    assert [p.text for p in pieces if p.trained] == [m["content"] + end for m in CHAT if m["role"] == "assistant"]
    assert t.end_of_turn_id(tok) == tok.convert_tokens_to_ids(end) and t.end_of_turn_id(tok) in t.stop_token_ids

    # 3. The Modelfile carries the entry's multi-turn Ollama form, which renders every turn as the Jinja does (BOS
    #    left to llama.cpp, which adds it itself), whether the chat waits for an answer or ends with one.
    mf = parse_modelfile(gguf.modelfile_text("m.gguf", tok, t, load_config(None).inference, True, "src"))
    assert mf["template"] == entry.ollama_form(tok.eos_token) and end in mf["stops"]
    for messages in (chat[:-1], chat):
        want = jinja(messages, True)
        want = want[len(BOS) :] if want.startswith(BOS) else want
        assert go_render(mf["template"], ollama_values(messages, mf["system"])) == want


def test_the_tokenizers_own_template_gets_the_ollama_form_it_renders_as(tok):
    """A tokenizer whose own template ("chat") is a registered layout exports as that entry, multi-turn."""
    for name, entry in TEMPLATES.items():
        own = tok.__class__(tokenizer_object=tok.backend_tokenizer, bos_token=BOS, eos_token=EOS)
        own.chat_template = entry.jinja
        t = PromptTemplate.from_config("chat", own)
        assert gguf.chat_style(own, t) == name
        go, _, style = gguf.ollama_template(own, t, True)
        assert style == name and go == entry.ollama_form(EOS)


def test_an_entry_cannot_leave_out_its_multi_turn_ollama_form():
    with pytest.raises(TypeError, match="ollama"):
        ChatTemplate(name="x", jinja="{{ messages }}", end_of_turn="<x>", tokens=("<x>",))
    with pytest.raises(ValueError, match="range over .Messages"):
        ChatTemplate(name="x", jinja="{{ messages }}", ollama="{{ .Prompt }}", end_of_turn="<x>", tokens=("<x>",))
    with pytest.raises(ValueError, match="must be one of its tokens"):
        ChatTemplate(name="x", jinja="{{ messages }}", ollama="{{ range .Messages }}{{ end }}", end_of_turn="<y>")


def test_config_takes_every_registered_name():
    for name in TEMPLATES:
        assert load_config(None, [f"data.prompt_template={name}"]).data.prompt_template == name


# The chat templates the instruction-tuned checkpoints ship (tokenizer_config.json of google/gemma-2-2b-it,
# mistralai/Mistral-7B-Instruct-v0.1, microsoft/Phi-3-mini-4k-instruct): refusing system turns, checking that roles
# alternate, trimming, EOS after the last answer; each still renders as its registered entry.
SHIPPED = {
    "gemma": (
        "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
        "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
    ),
    "mistral": (
        "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% else %}"
        "{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
    ),
    "phi3": (
        "{% for message in messages %}{% if message['role'] == 'system' %}"
        "{{'<|system|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}"
        "{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}"
        "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
    ),
}


@pytest.mark.parametrize("name", SHIPPED)
def test_a_shipped_template_exports_as_its_registered_entry(tok, name):
    """The Modelfile writer picks the entry for the checkpoint's own template: its Ollama form and stop token."""
    own = tok.__class__(tokenizer_object=tok.backend_tokenizer, bos_token=BOS, eos_token=EOS)
    own.chat_template = SHIPPED[name]
    t = PromptTemplate.from_config("chat", own)
    go, _, style = gguf.ollama_template(own, t, True)
    assert style == name and go == TEMPLATES[name].ollama_form(EOS)
    mf = parse_modelfile(gguf.modelfile_text("m.gguf", own, t, load_config(None).inference, True, "src"))
    assert TEMPLATES[name].end_of_turn_text(EOS) in mf["stops"]


def test_a_tool_call_is_trained_and_the_tools_output_is_not(tok):
    """A messages row with an OpenAI-style tool call (arguments as a JSON string) and the tool's output: cleaned,
    rendered with its tool definitions, and masked so that the assistant's call and its final answer are trained
    (each with <|im_end|>) and the tool's output, the definitions and the user turn are not."""
    from ftkit.config import DataCfg
    from ftkit.data import clean_conversation
    from ftkit.prompts import IGNORE_INDEX, encode_conversations

    call = {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    row = {
        "tools": [WEATHER],
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "name": "get_weather", "content": "temperature=18;sky=clear"},
            {"role": "assistant", "content": "It is 18 C and clear."},
        ],
    }
    from tokenizers import Tokenizer, decoders

    clean = clean_conversation(row, DataCfg(), "messages", "line 1")
    core = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    core.decoder = decoders.ByteLevel()  # to read the masked and trained text back
    own = tok.__class__(tokenizer_object=core, bos_token=BOS, eos_token=EOS)
    own.chat_template = TOOL_TEMPLATE
    t = PromptTemplate.from_config("chat", own)
    [(ids, labels, status)] = encode_conversations(t, own, [clean["messages"]], 512, [clean["tools"]])
    trained, masked, span = [], "", []
    for i, lab in zip(ids, labels):
        if lab == IGNORE_INDEX:
            masked += own.decode([i])
            trained, span = (trained + [own.decode(span)], []) if span else (trained, span)
        else:
            span.append(i)
    trained += [own.decode(span)] if span else []
    text = own.apply_chat_template(clean["messages"], tools=[WEATHER], chat_template=TOOL_TEMPLATE, tokenize=False)
    # the whole rendering, less the whitespace after the last turn (a wasted token: PromptTemplate.pieces)
    assert status == "ok" and own.decode(ids) == text.rstrip()
    assert trained == [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
        "It is 18 C and clear.<|im_end|>",
    ]
    assert all(x in masked for x in ("temperature=18;sky=clear", "get_weather", "Weather in Paris?"))


def test_a_template_that_ignores_tool_calls_is_refused(tok):
    from ftkit.errors import UserError
    from ftkit.prompts import encode_conversations

    for name in TEMPLATES:
        t = PromptTemplate.from_config(name, tok, conversations=True)
        convo = [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "f"}}]},
            {"role": "tool", "content": "b"},
            {"role": "assistant", "content": "c"},
        ]
        with pytest.raises(UserError, match=f"the {name} template does not render them; use a template that does"):
            encode_conversations(t, tok, [convo], 512)
