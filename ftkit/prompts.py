"""Prompt templates and the tokenization that masks the prompt out of the loss.

Training saves the template it used (`prompt_template.json`); inference, evaluation and export load that
file instead of re-deriving it, so that the prompt a model was trained on and the prompt it is asked
with can never drift apart.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .cli import UserError

IGNORE_INDEX = -100  # the label value that torch's cross-entropy skips

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


@dataclass
class PromptTemplate:
    kind: str  # "alpaca" or "chat"
    prompt_with_input: str = ALPACA_WITH_INPUT
    prompt_no_input: str = ALPACA_NO_INPUT
    system_prompt: str | None = None
    chat_template: str | None = None  # the tokenizer's Jinja template, frozen at training time
    stop_token_ids: list[int] = field(default_factory=list)
    stop_strings: list[str] = field(default_factory=list)

    @classmethod
    def from_config(cls, kind: str, tokenizer, system_prompt: str | None = None) -> "PromptTemplate":
        if kind == "chat":
            if not getattr(tokenizer, "chat_template", None):
                raise UserError(
                    "data.prompt_template is 'chat' but the tokenizer has no chat template; "
                    "use data.prompt_template=alpaca for a base (non-instruct) model"
                )
            t = cls(kind="chat", system_prompt=system_prompt, chat_template=tokenizer.chat_template)
            # The end-of-turn token closes an assistant reply; generation must stop there too.
            end = t.end_of_turn_id(tokenizer)
            stops = {end} if end is not None else set()
        else:
            t = cls(kind="alpaca", system_prompt=system_prompt)
            stops = set()
        if tokenizer.eos_token_id is not None:
            stops.add(int(tokenizer.eos_token_id))
        t.stop_token_ids = sorted(int(s) for s in stops)
        return t

    def end_of_turn_id(self, tokenizer) -> int | None:
        """The token that closes an assistant turn in the chat template (<|im_end|>, <|eot_id|>, ...): the last
        token after a probe answer; None for Alpaca prompts."""
        if self.kind != "chat":
            return None
        tail = self._chat_response_text(tokenizer, "q", None, "OK").rstrip()
        suffix = tail[tail.index("OK") + 2 :] if "OK" in tail else ""
        ids = tokenizer(suffix, add_special_tokens=False)["input_ids"] if suffix else []
        return ids[-1] if ids else None

    # -- rendering ---------------------------------------------------------------------------------
    def _messages(self, instruction: str, input_text: str | None) -> list[dict[str, str]]:
        user = instruction if not input_text else f"{instruction}\n\n{input_text}"
        msgs = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return msgs + [{"role": "user", "content": user}]

    def render_prompt(self, tokenizer, instruction: str, input_text: str | None = None) -> str:
        """The text the model sees before its answer."""
        if self.kind == "chat":
            return tokenizer.apply_chat_template(
                self._messages(instruction, input_text),
                tokenize=False,
                add_generation_prompt=True,
                chat_template=self.chat_template,
            )
        body = (
            self.prompt_with_input.format(instruction=instruction, input=input_text)
            if input_text
            else self.prompt_no_input.format(instruction=instruction)
        )
        return f"{self.system_prompt}\n\n{body}" if self.system_prompt else body

    def _chat_response_text(self, tokenizer, instruction: str, input_text: str | None, output: str) -> str:
        msgs = self._messages(instruction, input_text)
        prompt = tokenizer.apply_chat_template(
            msgs, tokenize=False, add_generation_prompt=True, chat_template=self.chat_template
        )
        full = tokenizer.apply_chat_template(
            msgs + [{"role": "assistant", "content": output}], tokenize=False, chat_template=self.chat_template
        )
        if not full.startswith(prompt):
            raise UserError(
                "the chat template renders the prompt differently with and without the answer, so "
                "prompt tokens cannot be masked; use data.prompt_template=alpaca"
            )
        return full[len(prompt) :]

    def prompt_ids(self, tokenizer, instruction: str, input_text: str | None = None) -> list[int]:
        text = self.render_prompt(tokenizer, instruction, input_text)
        # A chat template writes its own BOS into the text; the Alpaca text relies on the tokenizer's.
        return tokenizer(text, add_special_tokens=self.kind != "chat")["input_ids"]

    def encode(
        self, tokenizer, instruction: str, input_text: str | None, output: str, max_length: int
    ) -> tuple[list[int], list[int], str]:
        """Token ids and labels for one row; labels are IGNORE_INDEX on the prompt.

        Prompt and answer are tokenized apart and joined as ids, so the mask boundary is exact even where
        a tokenizer would merge characters across it. Returns a status: ok, truncated or fully_masked.
        """
        p_ids = self.prompt_ids(tokenizer, instruction, input_text)
        if self.kind == "chat":
            resp = self._chat_response_text(tokenizer, instruction, input_text, output).rstrip()
        else:
            resp = output
        r_ids = tokenizer(resp, add_special_tokens=False)["input_ids"]
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
            return cls(**json.loads(path.read_text(encoding="utf-8")))
        except (ValueError, TypeError, OSError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise UserError(f"'{path}' is not a valid prompt template ({e}); re-run finetune.py") from None
