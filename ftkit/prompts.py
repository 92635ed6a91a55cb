"""Prompt templates and the tokenization that masks the prompt out of the loss.

Training saves the template it used (`prompt_template.json`); inference, evaluation and export load that
file instead of re-deriving it, so that the prompt a model was trained on and the prompt it is asked
with can never drift apart.

Conversations (and Alpaca rows under a chat template) are tokenized turn by turn: the template renders the
conversation up to each assistant turn with and without that turn, the differences are the pieces, and each
piece is tokenized on its own and joined as ids. So the loss covers exactly every trained assistant turn's
content plus its end-of-turn token, whatever the template's layout.
"""

from __future__ import annotations

import secrets
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from .errors import UserError
from .jsonl import loads
from .templates import ALPACA_PREAMBLE, TEMPLATES

IGNORE_INDEX = -100  # the label value that torch's cross-entropy skips
# From this many assistant turns a conversation is cut in one render (PromptTemplate._pieces_in_one_pass).
ONE_PASS_TURNS = 3

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
# The registry's alpaca chat template renders a single-turn conversation as exactly this prompt.
ALPACA_NO_INPUT = ALPACA_PREAMBLE + "\n\n### Instruction:\n{instruction}\n\n### Response:\n"


@dataclass
class Piece:
    """One stretch of a rendered conversation: trained or masked, and whether an assistant turn ends with it
    (where a long conversation may be cut without splitting a turn)."""

    text: str
    trained: bool
    turn_end: bool = False


@dataclass
class PromptTemplate:
    kind: str  # "alpaca" (the Stanford prompt, single-turn) or "chat" (a Jinja chat template)
    prompt_with_input: str = ALPACA_WITH_INPUT
    prompt_no_input: str = ALPACA_NO_INPUT
    system_prompt: str | None = None
    chat_template: str | None = None  # the tokenizer's Jinja template, frozen at training time
    stop_token_ids: list[int] = field(default_factory=list)
    stop_strings: list[str] = field(default_factory=list)
    # Which template: data.prompt_template as given ("chat" = the tokenizer's own, a shipped name, or a
    # file path). None in runs saved before names existed (kind says all there is then).
    name: str | None = None

    @classmethod
    def from_config(
        cls, kind: str, tokenizer, system_prompt: str | None = None, conversations: bool = False
    ) -> "PromptTemplate":
        """The template data.prompt_template names. `conversations`: the rows are multi-turn, so "alpaca"
        means the Alpaca layout as a chat template (the registry's alpaca entry) rather than the single-turn prompt."""
        if kind == "alpaca" and not conversations:
            t = cls(kind="alpaca", system_prompt=system_prompt, name="alpaca")
            stops = set()
        else:
            t = cls(kind="chat", system_prompt=system_prompt, chat_template=_jinja(kind, tokenizer), name=kind)
            # The end-of-turn token closes an assistant reply; generation must stop there too.
            end = t.end_of_turn_id(tokenizer)
            stops = {end} if end is not None else set()
        if tokenizer.eos_token_id is not None:
            stops.add(int(tokenizer.eos_token_id))
        t.stop_token_ids = sorted(int(s) for s in stops)
        return t

    def end_of_turn_id(self, tokenizer) -> int | None:
        """The token that closes an assistant turn in the chat template (<|im_end|>, <|eot_id|>, ...): the first
        special token trained after a probe answer (Phi-3's template writes EOS after the last turn's <|end|>, and
        generation stops at the turn's end), else its last trained token; None for Alpaca prompts."""
        if self.kind != "chat":
            return None
        pieces = self.pieces(tokenizer, [{"role": "user", "content": "q"}, {"role": "assistant", "content": "OK"}])
        end = next(p.text for p in pieces if p.trained)[len("OK") :]
        ids = tokenizer(end, add_special_tokens=False)["input_ids"] if end else []
        special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
        return next((i for i in ids if i in special), ids[-1] if ids else None)

    # -- rendering ---------------------------------------------------------------------------------
    def _messages(self, instruction: str, input_text: str | None) -> list[dict[str, str]]:
        user = instruction if not input_text else f"{instruction}\n\n{input_text}"
        msgs = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return msgs + [{"role": "user", "content": user}]

    def render_prompt(self, tokenizer, instruction: str, input_text: str | None = None) -> str:
        """The text the model sees before its answer."""
        if self.kind == "chat":
            return self.render(tokenizer, self._messages(instruction, input_text), True)
        body = (
            self.prompt_with_input.format(instruction=instruction, input=input_text)
            if input_text
            else self.prompt_no_input.format(instruction=instruction)
        )
        return f"{self.system_prompt}\n\n{body}" if self.system_prompt else body

    def with_system(self, messages: list[dict]) -> list[dict]:
        """data.system_prompt as the first turn of a conversation that brings no system turn of its own."""
        if self.system_prompt and (not messages or messages[0]["role"] != "system"):
            return [{"role": "system", "content": self.system_prompt}, *messages]
        return messages

    def render(self, tokenizer, messages: list[dict], generation_prompt: bool, tools: list | None = None) -> str:
        from .templating import render

        try:
            # What tokenizer.apply_chat_template(tokenize=False, tools=tools) renders, under a time and size limit.
            return render(
                self.chat_template,
                self.name or "chat",
                **tokenizer.special_tokens_map,
                messages=[{k: m[k] for k in TEMPLATE_KEYS if k in m} for m in messages],
                tools=tools,
                documents=None,
                add_generation_prompt=generation_prompt,
            )
        except UserError:  # the template's own fault (a syntax error, a limit), said as such
            raise
        except Exception as e:  # jinja's TemplateError, or raise_exception() inside the template
            roles = "/".join(dict.fromkeys(m["role"] for m in messages))
            raise UserError(
                f"the {self.name or 'chat'} template cannot render a {roles} conversation ({e}); drop the "
                "turns it refuses (a system turn, often) or choose another data.prompt_template"
            ) from None

    def supports_tools(self, tokenizer) -> bool:
        """Whether the template writes an assistant turn's tool call and the tool's output (many ignore both
        and would train the answer to a question the model never saw asked). Printable probe names: templates
        write arguments through tojson, which escapes control characters."""
        call = {"type": "function", "function": {"name": "ftkit_probe_tool", "arguments": {"q": "ftkit_probe_arg"}}}
        probe = [
            {"role": "user", "content": "\x01"},
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "content": "\x05", "name": "ftkit_probe_tool"},
            {"role": "assistant", "content": "\x02"},
        ]
        try:
            text = self.render(tokenizer, probe, False)
        except UserError:
            return False
        return all(x in text for x in ("ftkit_probe_tool", "ftkit_probe_arg", "\x05", "\x02"))

    def pieces(self, tokenizer, messages: list[dict], tools: list | None = None) -> list[Piece]:
        """The conversation cut at the mask boundaries (module docstring). The template renders the turns up
        to each assistant turn with the generation prompt (P) and with the turn (F); P's new text is masked,
        F's new text is the assistant content, its end-of-turn marker (trained unless the turn says
        "train": false) and whitespace after the marker (masked). Turns after the last assistant turn
        teach nothing and are left out."""
        # a tool call is trained with its turn's text, which the one-pass markers (in place of the text) would cut
        if (
            sum(m["role"] == "assistant" for m in messages) >= ONE_PASS_TURNS
            and not tools
            and not any("tool_calls" in m for m in messages)
        ):
            one_pass = self._pieces_in_one_pass(tokenizer, messages)
            if one_pass is not None:
                return one_pass
        out: list[Piece] = []
        done = ""
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            p = self.render(tokenizer, messages[:i], True, tools)
            f = self.render(tokenizer, messages[: i + 1], False, tools)
            if not p.startswith(done) or not f.startswith(p):
                raise UserError(
                    f"the {self.name or 'chat'} template renders earlier turns differently once later turns "
                    "are added, so the assistant turns cannot be masked exactly; choose another "
                    f"data.prompt_template ({', '.join(TEMPLATES)})"
                )
            new = f[len(p) :]
            at, end, tail = self._turn_end(tokenizer, m, new)
            out += [
                Piece(p[len(done) :] + new[:at], False),
                Piece(m["content"] + end, m.get("train", True) is not False),
                Piece(tail[len(end) :], False, turn_end=True),
            ]
            done = f
        if out:  # whitespace after the last turn's end is followed by nothing: it would be a wasted token
            out[-1].text = ""
        return out

    def _pieces_in_one_pass(self, tokenizer, messages: list[dict]) -> list[Piece] | None:
        """The pieces `pieces` cuts turn by turn, from three renders instead of two for every assistant turn
        (each as long as the conversation so far: a 5,000-turn conversation took 9 s). The conversation is
        rendered once with a marker for each assistant content and cut at the markers; the last turn, rendered
        as `pieces` does, gives the end-of-turn text. None, for the turn-by-turn way to decide, unless the
        pieces put back together are exactly the template's own text."""
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        convo = messages[: last + 1]
        nonce = secrets.token_hex(8)
        if any(nonce in m["content"] for m in convo):
            return None
        try:
            p, f = self.render(tokenizer, convo[:last], True), self.render(tokenizer, convo, False)
        except UserError:  # said turn by turn, naming the turns the template refuses
            return None
        if not f.startswith(p):
            return None
        _, end, tail = self._turn_end(tokenizer, convo[last], f[len(p) :])
        if end != tail.rstrip():  # EOS put after a template that writes no end of turn: not in the text
            return None
        marked = [
            dict(m, content=f"ftkit{nonce}turn{i}") if m["role"] == "assistant" else m for i, m in enumerate(convo)
        ]
        try:
            text, out, cursor = self.render(tokenizer, marked, False), [], 0
        except UserError:
            return None
        after_end = end + tail[len(end) :]
        for i, m in enumerate(convo):
            if m["role"] != "assistant":
                continue
            mark = marked[i]["content"]
            pos = text.find(mark, cursor)
            if pos < 0 or not text.startswith(after_end, pos + len(mark)):
                return None
            out += [
                Piece(text[cursor:pos], False),
                Piece(m["content"] + end, m.get("train", True) is not False),
                Piece(tail[len(end) :], False, turn_end=True),
            ]
            cursor = pos + len(mark) + len(after_end)
        if cursor != len(text) or "".join(x.text for x in out) != f:
            return None
        out[-1].text = ""
        return out

    def _turn_end(self, tokenizer, m: dict, new: str) -> tuple[int, str, str]:
        """Where assistant turn `m`'s content starts in `new` (what the template adds for the turn, header
        included), the end-of-turn text trained after the content, and all the template writes after it."""
        at = new.find(m["content"])
        if at < 0:
            raise UserError(
                f"the {self.name or 'chat'} template does not write an assistant turn's text as given, so "
                "its tokens cannot be found for the loss; choose another data.prompt_template"
            )
        tail = new[at + len(m["content"]) :]
        end = tail.rstrip()
        if not end.strip() and tokenizer.eos_token:
            # A template that closes an answer with nothing would never teach the model to stop (it would
            # ramble to max_new_tokens); EOS is trained after the answer instead, as for Alpaca rows.
            end = tokenizer.eos_token
        return at, end, tail

    def text_ids(self, tokenizer, text: str) -> list[int]:
        """Token ids of the text that starts a prompt, with the tokenizer's BOS where the text has none of its own."""
        return tokenizer(text, add_special_tokens=self.tokenizer_bos())["input_ids"]

    def tokenizer_bos(self) -> bool:
        """Whether the tokenizer, not the text, gives a prompt its BOS: a chat template writes its own, the Alpaca
        layouts (the prompt, and the registry's alpaca chat template) rely on the tokenizer's."""
        entry = TEMPLATES.get(self.name or "")
        return self.kind != "chat" or (entry is not None and entry.tokenizer_bos)

    def prompt_ids(self, tokenizer, instruction: str, input_text: str | None = None) -> list[int]:
        return self.text_ids(tokenizer, self.render_prompt(tokenizer, instruction, input_text))

    def messages_prompt_ids(self, tokenizer, messages: list[dict]) -> list[int]:
        """The prompt for the next assistant turn after `messages` (a conversation ending with a user turn)."""
        return self.text_ids(tokenizer, self.messages_prompt_text(tokenizer, messages))

    def messages_prompt_text(self, tokenizer, messages: list[dict]) -> str:
        if self.kind == "chat":
            return self.render(tokenizer, self.with_system(messages), True)
        # The Alpaca prompt is single-turn: the last user turn is the instruction, the earlier turns become
        # the Input field, and a system turn the system prompt.
        system = messages[0]["content"] if messages and messages[0]["role"] == "system" else self.system_prompt
        turns = [m for m in messages if m["role"] != "system"]
        context = "\n".join(f"{'User' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in turns[:-1])
        return replace(self, system_prompt=system).render_prompt(tokenizer, turns[-1]["content"], context or None)

    def encode(
        self, tokenizer, instruction: str, input_text: str | None, output: str, max_length: int
    ) -> tuple[list[int], list[int], str]:
        """Token ids and labels for one Alpaca row; labels are IGNORE_INDEX on the prompt.

        Prompt and answer are tokenized apart and joined as ids, so the mask boundary is exact even where
        a tokenizer would merge characters across it. Returns a status: ok, truncated or fully_masked.
        """
        if self.kind == "chat":
            msgs = self._messages(instruction, input_text) + [{"role": "assistant", "content": output}]
            return encode_conversations(self, tokenizer, [msgs], max_length)[0]
        p_ids = self.prompt_ids(tokenizer, instruction, input_text)
        r_ids = tokenizer(output, add_special_tokens=False)["input_ids"]
        eos = tokenizer.eos_token_id
        # Without a trained EOS the model never learns to stop and rambles to max_new_tokens.
        if eos is not None and (not r_ids or r_ids[-1] not in self.stop_token_ids):
            r_ids = r_ids + [eos]
        ids = p_ids + r_ids
        labels = [IGNORE_INDEX] * len(p_ids) + list(r_ids)
        status = "ok"
        if len(ids) > max_length:
            ids, labels = ids[:max_length], labels[:max_length]
            status = "truncated"
        if all(lbl == IGNORE_INDEX for lbl in labels):
            status = "fully_masked"
        return ids, labels, status

    # -- persistence -------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def load(cls, path: Path) -> "PromptTemplate":
        if not path.is_file():
            raise UserError(
                f"'{path}' is missing; this run did not finish training. Re-run finetune.py "
                "or point --config at a finished run"
            )
        try:
            return cls(**loads(path.read_text(encoding="utf-8")))
        except (ValueError, TypeError, OSError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise UserError(f"'{path}' is not a valid prompt template ({e}); re-run finetune.py") from None


def _jinja(kind: str, tokenizer) -> str:
    """The Jinja source data.prompt_template names, checked against the tokenizer."""
    if kind == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise UserError(
                "data.prompt_template is 'chat' but the tokenizer has no chat template; use "
                f"data.prompt_template={', '.join(TEMPLATES)} (a shipped template) for a base (non-instruct) model"
            )
        return tokenizer.chat_template
    if kind in TEMPLATES:
        vocab = tokenizer.get_vocab()
        missing = [t for t in TEMPLATES[kind].tokens if t not in vocab]
        if missing:
            raise UserError(
                f"data.prompt_template={kind} writes {', '.join(missing)}, which the tokenizer does not have "
                "as tokens; use data.prompt_template=alpaca, or a template made of this tokenizer's tokens"
            )
        return TEMPLATES[kind].jinja
    from .jsonl import read_text

    text = read_text(Path(kind).expanduser(), "data.prompt_template", "point it at a Jinja chat template file")
    if "messages" not in text:
        raise UserError(
            f"data.prompt_template '{kind}' does not look like a chat template (it never reads `messages`); "
            "point it at a Jinja chat template file"
        )
    return text


def _token_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of many texts, no special tokens added. With a fast tokenizer the Rust encoder is called
    directly (what tokenizer(texts) calls too), without building the attention masks and offsets that are
    thrown away here: half the time on 50k conversations."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    return [e.ids for e in encode(texts, add_special_tokens=False)]


# What a message hands a chat template: its text, an assistant's tool calls, which call a tool turn answers.
TEMPLATE_KEYS = ("role", "content", "tool_calls", "name", "tool_call_id")
CHUNK = 2000  # conversations rendered while the previous chunk is being tokenized


def encode_conversations(
    template: PromptTemplate,
    tokenizer,
    conversations: list[list[dict]],
    max_length: int,
    tools: list[list | None] | None = None,
) -> list[tuple[list[int], list[int], str]]:
    """(ids, labels, status) per conversation; labels are IGNORE_INDEX except on trained assistant turns.

    Conversations are rendered and cut into pieces in chunks; each chunk's pieces are tokenized in one
    batched call on a worker thread (the Rust tokenizer releases the GIL), while the next chunk renders.
    A conversation longer than max_length is cut after its last whole assistant turn that fits
    ("truncated_at_turn"); only when even its first trained turn does not fit is it cut inside a turn
    ("truncated"). Status "untrainable": no trained token at all (no assistant turn, or all "train": false);
    "fully_masked": the cut left none. `tools`: each conversation's tool definitions (None: none), for the template.
    """
    from concurrent.futures import ThreadPoolExecutor

    tools = tools or [None] * len(conversations)
    if any(m["role"] == "tool" or "tool_calls" in m for c in conversations for m in c):
        check_tools(template, tokenizer)

    bos = template.text_ids(tokenizer, "") if template.tokenizer_bos() else []
    out = []
    with ThreadPoolExecutor(1) as pool:
        jobs = []
        for at in range(0, len(conversations), CHUNK):
            cut = [
                _pieces_of(template, tokenizer, c, t)
                for c, t in zip(conversations[at : at + CHUNK], tools[at : at + CHUNK])
            ]
            jobs.append((cut, pool.submit(_token_ids, tokenizer, [p.text for ps in cut for p in ps])))
        for cut, job in jobs:
            toks = iter(job.result())
            out += [_assemble(ps, toks, bos, max_length) for ps in cut]
    return out


def check_tools(template: PromptTemplate, tokenizer) -> None:
    if not template.supports_tools(tokenizer):
        raise UserError(
            f"the rows have tool calls but the {template.name or 'chat'} template does not render them; use a "
            "template that does: data.prompt_template=chat on a model whose own template renders tools (Qwen2.5, "
            "Qwen3, Llama 3.1+, Mistral v0.3 instruct), or data.prompt_template=FILE.jinja that writes tool_calls "
            "and tool turns"
        )


def _pieces_of(template: PromptTemplate, tokenizer, conversation: list[dict], tools: list | None) -> list[Piece]:
    try:
        return template.pieces(tokenizer, template.with_system(conversation), tools)
    except UserError as e:  # the file line is gone after the split; the text finds the row
        first = next((m["content"] for m in conversation if m["role"] != "system"), "")
        raise UserError(f"a conversation (its first user turn starts {first[:40]!r}): {e}") from None


def _assemble(pieces: list[Piece], toks, bos: list[int], max_length: int) -> tuple[list[int], list[int], str]:
    ids, labels, ends, trained = list(bos), [IGNORE_INDEX] * len(bos), [], False
    for p in pieces:
        t = next(toks)
        ids += t
        labels += t if p.trained else [IGNORE_INDEX] * len(t)
        trained = trained or (p.trained and bool(t))
        if p.turn_end and trained:
            ends.append(len(ids))
    if not ends:
        return ids, labels, "untrainable"
    status = "ok"
    if len(ids) > max_length:
        fit = [e for e in ends if e <= max_length]
        n, status = (fit[-1], "truncated_at_turn") if fit else (max_length, "truncated")
        ids, labels = ids[:n], labels[:n]
        if all(lbl == IGNORE_INDEX for lbl in labels):
            status = "fully_masked"
    return ids, labels, status
