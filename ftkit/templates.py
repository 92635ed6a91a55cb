"""The prompt-template registry: one entry per named chat template, holding everything the stages need of it.

An entry gives the name (`data.prompt_template`), the Jinja chat template (training, inference, evaluation and
the GGUF's tokenizer.chat_template), the Ollama TEMPLATE (the Modelfile; a Go text/template over .System and
.Messages), the end-of-turn marker (trained after every answer, and where generation stops) and the markers that
must be single tokens of the tokenizer. Adding a template is adding one entry to TEMPLATES: config validation,
prompts.py and gguf.py read it from here, and tests/test_templates.py renders a multi-turn conversation through
every entry in all three forms and checks that they agree.

"chat" (the tokenizer's own template) and a path to a .jinja file are not entries: their Jinja comes with the
tokenizer or the file, and the Modelfile gets a registered entry's Ollama form when they render as one does.
"""

from __future__ import annotations

from dataclasses import dataclass

# Stands for the tokenizer's EOS token in an entry's Ollama form and end of turn: a template that closes answers
# with EOS (alpaca) has no marker of its own, and EOS is the tokenizer's. NULs cannot occur in a template's text.
EOS = "\x00eos_token\x00"


def go_literal(text: str) -> str:
    """`text` as literal text of a Go template: copied verbatim, except an opening delimiter."""
    return text.replace("{{", '{{ "{{" }}')


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    jinja: str  # renders with transformers' variables: messages, add_generation_prompt, bos_token, eos_token
    # Ollama's form: .Messages (every turn, system ones included) and .System (the system text); it ends with the
    # assistant header, since Ollama renders it to generate. Required, and multi-turn: a Modelfile without it
    # would answer every turn as if it were the first.
    ollama: str
    end_of_turn: str  # the marker after each answer (EOS: the tokenizer's EOS token)
    tokens: tuple[str, ...] = ()  # markers that must be single tokens; spelled in pieces, no stop could match
    # The text has no BOS and the tokenizer adds its own, as for Alpaca prompts; otherwise the Jinja writes BOS
    # where the template wants one (bos_token) and the tokenizer adds none.
    tokenizer_bos: bool = False

    def __post_init__(self):
        if ".Messages" not in self.ollama:
            raise ValueError(
                f"template {self.name}: the Ollama form must range over .Messages; a single-turn form would drop "
                "every earlier turn of a chat"
            )
        if self.end_of_turn != EOS and self.end_of_turn not in self.tokens:
            raise ValueError(f"template {self.name}: its end of turn {self.end_of_turn!r} must be one of its tokens")

    def ollama_form(self, eos_token: str | None) -> str:
        """The Modelfile TEMPLATE for a tokenizer whose EOS token is `eos_token` (none: nothing, as the Jinja's
        undefined eos_token renders)."""
        return self.ollama.replace(EOS, go_literal(eos_token or ""))

    def end_of_turn_text(self, eos_token: str | None) -> str | None:
        return eos_token if self.end_of_turn == EOS else self.end_of_turn


# Meta's Llama-3-Instruct template, verbatim, so that a model tuned from the Llama-3 base (whose tokenizer has the
# tokens but no template) speaks the format that Llama-3 tools and runtimes expect.
LLAMA3 = ChatTemplate(
    name="llama3",
    jinja=(
        "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
        "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}"
        "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
        "{% if add_generation_prompt %}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    # No BOS: llama.cpp adds it itself (the GGUF's add_bos_token).
    ollama=(
        "{{- if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}"
        '{{- range .Messages }}{{- if ne .Role "system" }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n'
        "{{ .Content }}<|eot_id|>{{ end }}{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    end_of_turn="<|eot_id|>",
    tokens=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
)

CHATML = ChatTemplate(
    name="chatml",
    jinja=(
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + "
        "'\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    ollama=(
        "{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
        '{{- range .Messages }}{{- if ne .Role "system" }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n'
        "{{ end }}{{- end }}<|im_start|>assistant\n"
    ),
    end_of_turn="<|im_end|>",
    tokens=("<|im_start|>", "<|im_end|>"),
)

# The Alpaca layout, turn after turn: a single-turn conversation renders as the Alpaca prompt without input
# (prompts.ALPACA_NO_INPUT) plus the answer and EOS, so conversations and Alpaca rows train one format. No BOS in
# the text: as with Alpaca prompts, the tokenizer adds its own (PromptTemplate.text_ids), as llama.cpp does.
ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)
ALPACA = ChatTemplate(
    name="alpaca",
    jinja=(
        "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\n\n' }}{% set loop_messages = "
        "messages[1:] %}{% else %}{{ '" + ALPACA_PREAMBLE + "\n\n' }}{% set loop_messages = messages %}{% endif %}"
        "{% for message in loop_messages %}{% if message['role'] == 'user' %}{{ '### Instruction:\n' + "
        "message['content'] + '\n\n### Response:\n' }}{% elif message['role'] == 'assistant' %}"
        "{{ message['content'] + eos_token + '\n\n' }}{% endif %}{% endfor %}"
    ),
    ollama=(
        "{{- if .System }}{{ .System }}\n\n{{ else }}" + ALPACA_PREAMBLE + "\n\n{{ end }}"
        '{{- range .Messages }}{{- if eq .Role "user" }}### Instruction:\n{{ .Content }}\n\n### Response:\n{{ end }}'
        '{{- if eq .Role "assistant" }}{{ .Content }}' + EOS + "\n\n{{ end }}{{- end }}"
    ),
    end_of_turn=EOS,
    tokenizer_bos=True,
)

# Templates without a system turn of their own (Gemma, Mistral v0.1-v0.3) put the system text before the first
# user turn's text, as their published templates do; their Ollama forms find that turn by index (0, or 1 after a
# system turn in .Messages: turns alternate, so index 1 is a user turn only when 0 is the system one).
_FOLD_SYSTEM = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] + '\n\n' %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set system = '' %}{% set loop_messages = messages %}"
    "{% endif %}{{ bos_token }}"
)
_FIRST_USER_SYSTEM = "{{ if and $.System (le $i 1) }}{{ $.System }}\n\n{{ end }}"

# Gemma 2/3 instruction-tuned: 'model' for the assistant's turns; BOS written by the template.
GEMMA = ChatTemplate(
    name="gemma",
    jinja=(
        _FOLD_SYSTEM + "{% for message in loop_messages %}{% if message['role'] == 'assistant' %}"
        "{{ '<start_of_turn>model\n' + message['content'] + '<end_of_turn>\n' }}{% else %}"
        "{{ '<start_of_turn>' + message['role'] + '\n' + (system if loop.first else '') + message['content'] + "
        "'<end_of_turn>\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}"
        "{% endif %}"
    ),
    ollama=(
        '{{- range $i, $_ := .Messages }}{{- if eq .Role "user" }}<start_of_turn>user\n'
        + _FIRST_USER_SYSTEM
        + '{{ .Content }}<end_of_turn>\n{{ else if eq .Role "assistant" }}<start_of_turn>model\n{{ .Content }}'
        "<end_of_turn>\n{{ end }}{{- end }}<start_of_turn>model\n"
    ),
    end_of_turn="<end_of_turn>",
    tokens=("<start_of_turn>", "<end_of_turn>"),
)

# Mistral-7B-Instruct v0.1-v0.3: [INST] ... [/INST] around each user turn, each answer closed by EOS; the prompt
# ends at [/INST], so there is no assistant header. [INST] is plain text in v0.1/v0.2's vocabulary, hence no tokens.
MISTRAL = ChatTemplate(
    name="mistral",
    jinja=(
        _FOLD_SYSTEM + "{% for message in loop_messages %}{% if message['role'] == 'user' %}"
        "{{ '[INST] ' + (system if loop.first else '') + message['content'] + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
    ),
    ollama=(
        '{{- range $i, $_ := .Messages }}{{- if eq .Role "user" }}[INST] '
        + _FIRST_USER_SYSTEM
        + '{{ .Content }} [/INST]{{ else if eq .Role "assistant" }}{{ .Content }}'
        + EOS
        + "{{ end }}{{- end }}"
    ),
    end_of_turn=EOS,
)

# Phi-3 / Phi-3.5 instruct: every role (system included) as <|role|>, each turn closed by <|end|>.
PHI3 = ChatTemplate(
    name="phi3",
    jinja=(
        "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
    ),
    ollama="{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}<|end|>\n{{ end }}<|assistant|>\n",
    end_of_turn="<|end|>",
    tokens=("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
)

TEMPLATES: dict[str, ChatTemplate] = {t.name: t for t in (ALPACA, LLAMA3, CHATML, GEMMA, MISTRAL, PHI3)}
