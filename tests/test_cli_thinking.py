"""`k2local run` with a thinking model: reasoning kept apart from the answer, shown dimmed or folded (/think),
in --json as its own field. The session logic runs on a scripted stub generator; the terminal on the tiny
checkpoint served with a thinking template (its prompt opens <think>, so all its random output is reasoning)."""
from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from k2local.chat.template import ChatTemplate
from k2local.cli.chat_session import ChatSession, run_command
from k2local.generate import GenerationResult
from k2local.tiny import default_tiny_path
from k2local.tokenizer.tiktoken_bpe import load_tokenizer
from tests.test_cli_run import CLI, PROMPT, STATUS, cli_env, exit_with_ctrl_d, run_piped  # noqa: F401 (fixture)
from tests.thinking_models import K25_TEMPLATE, thinking_checkpoint

pexpect = pytest.importorskip("pexpect")


class ScriptedEngine:
    """The tiny tokenizer and a thinking template; its generator 'samples' the ids of the next scripted text."""

    name, max_context = "stub-thinker", 512

    def __init__(self, outputs: list[str]) -> None:
        self.tokenizer = load_tokenizer(default_tiny_path())
        self.template = ChatTemplate.from_string(K25_TEMPLATE)
        self.outputs = outputs
        self.prompts: list[str] = []
        self.stop_ids = {self.tokenizer.token_to_id("<|im_end|>")}

    def chat_ids(self, messages, tools=None, **kw) -> list[int]:
        text = self.template.render(messages, tools=tools, **kw)
        self.prompts.append(text)
        return self.tokenizer.encode(text, allow_special=True)

    def new_generator(self):
        eng = self

        class Gen:
            tokens: list[int] = []

            def generate(self, ids, params, stops, on_token=None, should_stop=None):
                out = eng.tokenizer.encode(eng.outputs.pop(0), allow_special=True)
                for t in out:
                    on_token(t)
                self.tokens = list(ids) + out
                return GenerationResult(out, "stop", len(ids), 0, 0.01, 0.01)

            def reset(self) -> None:
                self.tokens = []

        return Gen()


def test_session_keeps_reasoning_apart_and_hands_it_back() -> None:
    eng = ScriptedEngine(["Greet them.</think>Hello!<|im_end|>", "Again.</think>Hi again.<|im_end|>"])
    s = ChatSession(eng)
    assert s.thinks
    seen: dict[str, str] = {"r": "", "t": ""}
    t = s.ask("hi", on_text=lambda p: seen.__setitem__("t", seen["t"] + p),
              on_reasoning=lambda p: seen.__setitem__("r", seen["r"] + p))
    assert (t.reasoning, t.text) == ("Greet them.", "Hello!") == (seen["r"], seen["t"])
    assert s.messages[-1] == {"role": "assistant", "content": "Hello!", "reasoning_content": "Greet them."}
    j = t.to_json("m")
    assert j["message"] == {"role": "assistant", "content": "Hello!", "reasoning_content": "Greet them."}
    s.ask("more")
    assert "<|im_middle|><think>Greet them.</think>Hello!<|im_end|>" in eng.prompts[-1]
    assert s.last.text == "Hi again." and s.last.reasoning == "Again."

    assert run_command(s, "/think show").text == "Again."
    assert "hidden" in run_command(s, "/think off").text and not s.show_reasoning
    assert "shown" in run_command(s, "/think on").text and s.show_reasoning
    run_command(s, "/think")
    assert not s.show_reasoning
    bad = run_command(s, "/think maybe")
    assert bad.error and "usage" in bad.text
    assert "/think" in run_command(s, "/help").text


def test_thinking_view_dims_or_folds() -> None:
    from k2local.cli.run import _TextWriter, _ThinkingView

    out = io.StringIO()
    v = _ThinkingView(_TextWriter(out, sanitize=True), shown=True, dim=True)
    v.reasoning("I think\x1b[31m.")
    v.text("Answer.")
    v.end()
    assert out.getvalue() == "\x1b[2mI think\N{REPLACEMENT CHARACTER}[31m.\x1b[22m\n\nAnswer."
    out = io.StringIO()
    v = _ThinkingView(_TextWriter(out, sanitize=True), shown=False, dim=True)
    v.reasoning("one two ")
    v.reasoning("three")
    v.text("Answer.")
    text = out.getvalue()
    assert "one" not in text and "thought for 3 words" in text and text.endswith("\nAnswer.")
    out = io.StringIO()
    v = _ThinkingView(_TextWriter(out, sanitize=False), shown=False, dim=False)
    v.reasoning("secret")
    v.end()
    assert "\x1b" not in out.getvalue() and "secret" not in out.getvalue() and "thinking" in out.getvalue()


def test_run_shows_reasoning_dimmed_and_folds_it(cli_env, tmp_path: Path) -> None:
    ckpt = thinking_checkpoint(tmp_path / "thinker")
    child = pexpect.spawn(CLI[0], CLI[1:] + [str(ckpt), "--temperature", "0", "--seed", "0", "--max-tokens", "6"],
                          env=cli_env, cwd=str(tmp_path), encoding="utf-8", timeout=90, dimensions=(50, 200))
    child.expect_exact(PROMPT)
    child.sendline("hello")
    child.expect_exact("\x1b[2m")  # the random model never closes <think>: all it says is reasoning, dimmed
    child.expect(STATUS)
    child.expect_exact(PROMPT)
    child.sendline("/think off")
    child.expect("reasoning hidden")
    child.expect_exact(PROMPT)
    child.sendline("again")
    child.expect(r"thought for \d+ words")
    child.expect(STATUS)
    child.expect_exact(PROMPT)
    child.sendline("/think show")
    child.expect_exact(PROMPT)
    exit_with_ctrl_d(child)

    j = run_piped(cli_env, "hi\n", str(ckpt), "--json", "--temperature", "0", "--max-tokens", "6")
    assert j.returncode == 0, j.stderr
    msg = json.loads(j.stdout)["message"]
    assert msg["content"] == "" and msg["reasoning_content"]  # reasoning is reported apart from the answer
    p = run_piped(cli_env, "hi\n", str(ckpt), "--temperature", "0", "--max-tokens", "6")
    assert p.returncode == 0 and msg["reasoning_content"] not in p.stdout  # stdout carries the answer only
    v = run_piped(cli_env, "hi\n", str(ckpt), "-v", "--temperature", "0", "--max-tokens", "6")
    assert v.returncode == 0 and msg["reasoning_content"] in v.stderr  # -v: the reasoning on stderr
