"""`k2local run`: the real CLI in a pseudo-terminal (pexpect) and with piped input, on the tiny random model.

The tiny model's text is gibberish, so these tests check structure: prompts, status lines, files, cache reuse.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import pytest

from k2local.cli.chat_session import LineAssembler, SessionError, parse_conversation

pexpect = pytest.importorskip("pexpect")

CLI = [sys.executable, "-m", "k2local.cli", "run"]
PROMPT = ">>> "
STATUS = re.compile(r"prefill (\d+) tok [\d.]+ tok/s(?: \((\d+) cached\))? · decode (\d+) tok [\d.]+ tok/s · "
                    r"context (\d+)/(\d+)")


class Status(NamedTuple):
    """The status line printed after each answer."""

    prefill: int  # prompt tokens computed this turn
    cached: int  # prompt tokens whose KV was reused
    decode: int
    used: int
    max: int


@pytest.fixture(scope="session")
def cli_env(_k2local_cache: Path) -> dict[str, str]:
    """Environment for the CLI: the session's cache (tiny checkpoint built once, here), a plain wide terminal."""
    from k2local.tiny import default_tiny_path

    default_tiny_path()
    root = str(Path(__file__).resolve().parents[1])  # so `-m k2local.cli` imports this checkout from any cwd
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    # one torch thread per CLI process: the tiny model gains nothing from more, and test runners share cores
    return dict(os.environ, K2LOCAL_CACHE=str(_k2local_cache), PYTHONPATH=path, TERM="xterm", COLUMNS="200",
                LINES="50", OMP_NUM_THREADS="1")


def spawn(cli_env: dict[str, str], cwd: Path, *args: str):
    child = pexpect.spawn(CLI[0], CLI[1:] + ["--temperature", "0", "--seed", "0", *args], env=cli_env,
                          cwd=str(cwd), encoding="utf-8", timeout=90, dimensions=(50, 200))
    child.expect("RANDOM")  # no MODEL: says plainly the weights are random
    child.expect("loaded tiny-kimi_k2-v1: \\d+ tensors")
    child.expect(r"tier[^\n]*holds[^\n]*size")  # the plan summary: what is on GPU / RAM / disk
    child.expect_exact(PROMPT)
    return child


def status(child) -> Status:
    child.expect(STATUS)
    return Status(*(int(x or 0) for x in child.match.groups()))


def turn(child, text: str) -> Status:
    """Send a message, wait for its status line and the next prompt."""
    child.sendline(text)
    st = status(child)
    child.expect_exact(PROMPT)
    return st


def command(child, text: str, expect: str) -> re.Match:
    child.sendline(text)
    child.expect(expect)
    m = child.match
    child.expect_exact(PROMPT)
    return m


def stats(child) -> tuple[int, int]:
    """(/stats messages, cached tokens of the last prompt)."""
    child.sendline("/stats")
    child.expect(r"messages\s+(\d+)")
    msgs = int(child.match.group(1))
    child.expect(r"last prompt\s+\d+ tokens, cached (\d+)")
    cached = int(child.match.group(1))
    child.expect_exact(PROMPT)
    return msgs, cached


def exit_with_ctrl_d(child) -> None:
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, child.before


def test_multi_turn_reuses_kv_cache_and_keeps_history(cli_env, tmp_path: Path) -> None:
    child = spawn(cli_env, tmp_path, "--max-tokens", "12", "--max-context", "1024")
    first = turn(child, "Hello there, who are you?")
    assert first.max == 1024 and first.cached == 0 and 0 < first.decode <= 12 and first.used >= first.prefill
    assert stats(child) == (2, 0)

    second = turn(child, "And what can you do?")
    assert second.cached == first.used  # the whole first turn's KV was reused...
    assert second.prefill < first.used  # ...so only the new message was prefilled
    assert second.used > first.used
    assert stats(child) == (4, first.used)

    child.send("\x1b[A\r")  # up-arrow recalls "/stats"
    child.expect(r"last prompt\s+\d+ tokens, cached [1-9]")
    child.expect_exact(PROMPT)

    command(child, "/help", "/save FILE")
    command(child, "/bogus", "unknown command /bogus")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_ctrl_c_stops_the_answer_and_keeps_the_session(cli_env, tmp_path: Path) -> None:
    child = spawn(cli_env, tmp_path, "--ignore-eos", "--max-tokens", "400")
    child.sendline("Tell me a very long story")
    child.expect_exact("Tell me a very long story")
    child.expect(r"\S")  # the answer has started streaming
    child.sendintr()
    child.expect("interrupted · ")
    cut = status(child)
    child.expect_exact(PROMPT)
    assert 0 < cut.decode < 400

    command(child, "/set max_tokens 4", "max_tokens = 4")
    after = turn(child, "Go on")
    assert after.decode <= 4 and after.cached == cut.used  # the cut answer stays in the conversation and cache
    child.sendline("/stats")
    child.expect(r"messages\s+4 \(2 turns, 1 interrupted\)")
    child.expect_exact(PROMPT)

    child.send("half a line")
    child.expect_exact("half a line")  # readline has taken the text
    for _ in range(3):  # Ctrl-C at the prompt clears the line, does not exit
        child.sendintr()  # (CPython's readline can miss a SIGINT that lands while it handles a key: resend)
        if child.expect(["input cleared", pexpect.TIMEOUT], timeout=10) == 0:
            break
    else:
        pytest.fail("Ctrl-C at the prompt was ignored")
    child.expect_exact(PROMPT)
    exit_with_ctrl_d(child)


def test_ctrl_c_during_a_long_prefill_stops_within_one_chunk(cli_env, tmp_path: Path) -> None:
    """Ctrl-C while a long prompt (about 5k tokens, prefilled in chunks of 512) is prefilled stops it at the next
    chunk boundary, not at the prompt's end; the computed prefix stays in the KV cache and the next turn reuses it."""
    system = "The quick brown fox jumps over the lazy dog. " * 500
    child = spawn(cli_env, tmp_path, "--max-context", "8192", "--max-tokens", "1", "--system", system)
    child.sendline("hi")
    child.expect_exact("hi")
    time.sleep(1.5)  # the prefill is under way (it takes several seconds)
    t0 = time.monotonic()
    child.sendintr()
    child.expect("interrupted · ", timeout=60)
    took = time.monotonic() - t0
    cut = status(child)
    child.expect_exact(PROMPT)
    assert cut.decode == 0 and 0 < cut.used < cut.prefill  # stopped inside the prompt
    assert cut.used % 512 == 0  # at a chunk boundary

    child.sendline("hi")  # the same prompt again: the cut prefix is reused, the rest computed
    child.expect(r"prefill (\d+) tok ([\d.]+) tok/s \((\d+) cached\)")
    new, speed, cached = int(child.match.group(1)), float(child.match.group(2)), int(child.match.group(3))
    child.expect_exact(PROMPT)
    assert cached == cut.used and new + cached == cut.prefill
    chunk_s = 512 / speed  # one chunk at this machine's measured speed (the last chunks, the slowest)
    assert took < 2 * chunk_s + 2.0, (took, chunk_s)
    assert new / speed > took  # and well before the whole prompt would have been done
    exit_with_ctrl_d(child)


def test_save_load_system_and_multiline(cli_env, tmp_path: Path) -> None:
    child = spawn(cli_env, tmp_path, "--max-tokens", "6", "--system", "Be brief.")
    child.sendline('"""')
    child.sendline("line one")
    child.sendline('line two"""')
    child.expect(STATUS)
    child.expect_exact(PROMPT)
    child.sendline("first \\")
    child.sendline("second")
    child.expect(STATUS)
    child.expect_exact(PROMPT)
    command(child, "/system Answer in French.", "system prompt set")
    command(child, "/save chats/conv.json", "saved 4 messages to")

    saved = json.loads((tmp_path / "chats" / "conv.json").read_text())
    assert saved["system"] == "Answer in French."
    assert [m["role"] for m in saved["messages"]] == ["user", "assistant", "user", "assistant"]
    assert saved["messages"][0]["content"] == "line one\nline two"
    assert saved["messages"][2]["content"] == "first \nsecond"
    assert saved["sampling"]["temperature"] == 0.0

    command(child, "/clear", "conversation cleared")
    command(child, "/system -", "system prompt removed")
    (tmp_path / "broken.json").write_text("{not json")
    command(child, "/load broken.json", "not valid JSON")
    command(child, "/load chats/conv.json", "loaded 4 messages")
    command(child, "/system", "system prompt: Answer in French.")
    turn(child, "Continue")
    assert stats(child)[0] == 6
    command(child, "/save conv2.json", "saved 6 messages")
    again = json.loads((tmp_path / "conv2.json").read_text())
    assert again["messages"][:4] == saved["messages"] and again["messages"][4]["content"] == "Continue"
    exit_with_ctrl_d(child)


def run_piped(cli_env: dict[str, str], stdin: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + list(args), input=stdin, capture_output=True, text=True, env=cli_env, timeout=120)


SEEDED = ("--temperature", "0.8", "--seed", "7", "--max-tokens", "10")


def test_piped_question_prints_the_answer_and_exits(cli_env) -> None:
    p = run_piped(cli_env, "What is 2+2?\n", *SEEDED)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() and p.stdout.endswith("\n")
    assert "RANDOM" in p.stderr and ">>>" not in p.stdout
    assert "<|im_end|>" not in p.stdout  # special tokens are not part of the visible text

    j = run_piped(cli_env, "What is 2+2?\n", "--json", *SEEDED)
    assert j.returncode == 0, j.stderr
    a = json.loads(j.stdout)
    assert a["message"]["role"] == "assistant"
    assert p.stdout in (a["message"]["content"], a["message"]["content"] + "\n")  # same seed, same answer
    assert a["random_weights"] is True and a["model"] == "tiny-kimi_k2-v1"
    assert a["finish_reason"] in ("stop", "length") and 0 < a["usage"]["completion_tokens"] <= 10
    assert a["usage"]["cached_tokens"] == 0 and a["usage"]["prompt_tokens"] > 0
    assert 0 < a["context"]["used"] <= a["context"]["max"] == 8192
    assert set(a["timings"]) >= {"prefill_tokens_per_s", "decode_tokens_per_s"}


def test_user_errors_are_one_line(cli_env, tmp_path: Path) -> None:
    p = run_piped(cli_env, "hi\n", str(tmp_path / "nope"))
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0 and "no such file" in p.stderr
    p = run_piped(cli_env, "  \n")
    assert p.returncode == 2 and "no input on stdin" in p.stderr and "Traceback" not in p.stderr


def test_line_assembler_and_conversation_files() -> None:
    asm = LineAssembler()
    assert asm.feed("plain") == "plain" and not asm.pending
    assert asm.feed("a \\") is None and asm.pending and asm.feed("b") == "a \nb"
    assert asm.feed('"""x') is None and asm.feed("") is None and asm.feed('y"""') == "x\n\ny"
    assert asm.feed('"""inline"""') == "inline"
    system, msgs = parse_conversation([{"role": "system", "content": "S"}, {"role": "user", "content": "u"}])
    assert system == "S" and msgs == [{"role": "user", "content": "u"}]
    with pytest.raises(SessionError, match="message 0 needs a role"):
        parse_conversation({"messages": [{"content": "no role"}]})


def test_hard_interrupt_keeps_partial_answer_and_drops_cache() -> None:
    """A KeyboardInterrupt inside the model (second Ctrl-C) keeps what was said and resets the KV cache."""

    class Tok:
        def stream_decoder(self, skip_special_tokens: bool = False):
            class D:
                def feed(self, tid: int) -> str:
                    return f"<{tid}>"

                def flush(self) -> str:
                    return ""
            return D()

    class Gen:
        tokens: list[int] = []
        resets = 0

        def generate(self, ids, params, stops, on_token=None, should_stop=None):
            on_token(7)
            raise KeyboardInterrupt

        def reset(self) -> None:
            Gen.resets += 1

    class Eng:
        name, max_context, stop_ids, tokenizer = "stub", 64, {0}, Tok()

        def new_generator(self) -> Gen:
            return Gen()

        def chat_ids(self, messages) -> list[int]:
            return [1, 2, 3]

    from k2local.cli.chat_session import ChatSession

    s = ChatSession(Eng())
    t = s.ask("hi")
    assert t.finish_reason == "cancelled" and t.result is None and Gen.resets == 1
    assert s.messages == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "<7>"}]
