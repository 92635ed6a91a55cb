"""`inference.py --chat` used as a person uses it: in a terminal (tmux), typing, reading the streamed answer,
pressing Ctrl+C mid-answer, and using /save, /system, /reset and /quit. The embedded SmolLM2 demo model
answers (real text; slow enough on CPU to be interrupted). Skipped when tmux is not installed
(`make install` installs it)."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from helpers import REPO
from test_inference import make_run

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (make install adds it)")


class Terminal:
    """One tmux session on a private server socket, so nothing else the user runs in tmux is touched."""

    def __init__(self, command: str, cwd: Path):
        self.sock = f"ftkit-test-{uuid.uuid4().hex[:8]}"
        self.tmux(
            "new-session",
            "-d",
            "-s",
            "t",
            "-x",
            "200",
            "-y",
            "60",
            "-c",
            str(cwd),
            f"{command}; echo EXITED rc=$?; sleep 600",
        )

    def tmux(self, *args: str) -> str:
        return subprocess.run(["tmux", "-L", self.sock, *args], capture_output=True, text=True, check=True).stdout

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-J", "-S", "-2000", "-t", "t")

    def type(self, text: str) -> None:
        self.tmux("send-keys", "-t", "t", "-l", text)
        self.tmux("send-keys", "-t", "t", "Enter")

    def key(self, key: str) -> None:
        self.tmux("send-keys", "-t", "t", key)

    def wait(self, check, what: str, timeout: float = 120) -> str:
        end = time.time() + timeout
        while time.time() < end:
            s = self.screen()
            if check(s):
                return s
            time.sleep(0.25)
        raise AssertionError(f"timed out waiting for {what}; the screen shows:\n{self.screen()[-3000:]}")

    def wait_prompts(self, n: int, timeout: float = 120) -> str:
        return self.wait(lambda s: len(re.findall(r"^>>> ", s, re.M)) >= n, f"prompt #{n}", timeout)

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.sock, "kill-server"], capture_output=True)


def test_chat_in_a_terminal(tmp_path, embedded_model):
    make_run(tmp_path / "runs" / "demo", embedded_model, merged=False, **{"inference.max_new_tokens": 400})
    env = "HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false"
    cmd = f"env {env} {shlex.quote(sys.executable)} {shlex.quote(str(REPO / 'inference.py'))} --base --chat 2>err.log"
    term = Terminal(cmd, tmp_path)
    try:
        screen = term.wait_prompts(1)
        assert "chatting with the base model (chat template)" in screen and "/system TEXT" in screen

        term.type("What is the capital of France?")
        screen = term.wait_prompts(2)
        assert "Paris" in screen.split("What is the capital of France?")[1]

        # Ctrl+C in the middle of a long answer: it stops, the partial answer stays on screen and in history.
        term.type("Write a long story about a dragon who learns to fly.")
        term.wait(lambda s: len(s.split("learns to fly.")[-1].strip()) > 60, "the story to start streaming")
        term.key("C-c")
        screen = term.wait(lambda s: "[stopped; the partial answer is kept]" in s, "the answer to stop", 30)
        term.wait_prompts(3)
        story_on_screen = screen.split("learns to fly.")[-1].split("[stopped")[0].strip()

        term.key("C-c")  # at the prompt: a hint, not an exit
        term.wait(lambda s: "/quit or Ctrl+D leaves" in s, "the Ctrl+C hint", 10)
        term.type("/bogus")
        term.wait(lambda s: "unknown command /bogus" in s, "the unknown-command message", 10)
        term.type("/save chat.json")
        term.wait(lambda s: "(saved 4 messages to chat.json)" in s, "/save", 10)
        saved = json.loads((tmp_path / "chat.json").read_text())
        roles = [m["role"] for m in saved["messages"]]
        assert roles == ["user", "assistant", "user", "assistant"] and saved["template"] == "chat"
        assert "Paris" in saved["messages"][1]["content"] and "interrupted" not in saved["messages"][1]
        story = saved["messages"][3]
        assert story["interrupted"] is True and len(story["content"]) > 40
        assert story["content"][:40] in " ".join(story_on_screen.split())  # what was streamed is what was kept

        term.type("/system You are a pirate. Answer in one short sentence.")
        term.wait(lambda s: "(system prompt: 'You are a pirate." in s, "/system", 10)
        term.type("/reset")
        term.wait(lambda s: "(conversation cleared)" in s, "/reset", 10)
        term.type("Who are you?")
        n = len(re.findall(r"^>>> ", term.screen(), re.M))
        # The pirate may talk to the run's 400-token limit: minutes on a busy 2-core CPU.
        term.wait_prompts(n + 1, timeout=400)
        term.type("/save chat2.json")
        term.wait(lambda s: "(saved 2 messages to chat2.json)" in s, "the second /save", 10)
        saved = json.loads((tmp_path / "chat2.json").read_text())
        assert saved["system"] == "You are a pirate. Answer in one short sentence."
        assert [m["content"] for m in saved["messages"]][0] == "Who are you?" and saved["messages"][1]["content"]

        term.type("/quit")
        term.wait(lambda s: "EXITED rc=0" in s, "a clean exit", 20)
        assert "Traceback" not in (tmp_path / "err.log").read_text()
    finally:
        term.close()
