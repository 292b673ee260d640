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


PLACEMENT = re.compile(r"placement: float32 on CPU \(\d+ threads?\) · weights [\d.]+ MiB in RAM · experts RAM "
                       r"[\d.]+ MiB \(100% of uses\) · KV cache [\d.]+ MiB for \d+ tokens · /plan shows the table")
TABLE = re.compile(r"tier[^\n]*holds[^\n]*size")  # the placement table (/plan, --verbose)


def spawn(cli_env: dict[str, str], cwd: Path, *args: str, placement: re.Pattern = PLACEMENT):
    child = pexpect.spawn(CLI[0], CLI[1:] + ["--temperature", "0", "--seed", "0", *args], env=cli_env,
                          cwd=str(cwd), encoding="utf-8", timeout=90, dimensions=(50, 200))
    child.expect("RANDOM")  # no MODEL: says plainly the weights are random
    child.expect("loaded tiny-kimi_k2-v1: \\d+ tensors")
    child.expect(placement)  # one line of what is on GPU / RAM / disk (the table with --verbose)
    assert placement is TABLE or "holds" not in child.before  # no table unless asked for
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
    child.expect_exact("\x1b[?2004l")  # readline has handed the line over (bracketed paste mode off again)
    child.expect(r"[^\s\x1b]")  # the answer has started streaming
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
    command(child, "/save chats/conv.json", r"chats/conv.json: cannot write: directory chats does not exist "
                                            r"\(nothing written\)")
    assert not (tmp_path / "chats").exists()  # a missing directory is refused, not made
    (tmp_path / "chats").mkdir()
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


# ---------------------------------------------------------------------------------------------- paste, /plan, /stats
PASTE_START, PASTE_END = "\x1b[200~", "\x1b[201~"


def saved_messages(child, tmp_path: Path, name: str) -> list[dict]:
    command(child, f"/save {name}", "saved")
    return json.loads((tmp_path / name).read_text())["messages"]


def test_pasted_lines_are_one_message(cli_env, tmp_path: Path) -> None:
    """A bracketed paste (ESC[200~ ... ESC[201~, which the chat turns on: ESC[?2004h) of three lines, then Enter,
    is one message and one answer; so are three lines that arrive at once from a terminal that does not bracket
    pastes; a pasted block starting with / is text, not a command."""
    child = spawn(cli_env, tmp_path, "--max-tokens", "2")
    assert "\x1b[?2004h" in child.before  # bracketed paste mode is on at the prompt
    child.send(f"{PASTE_START}line one\nline two\nline three\n{PASTE_END}")
    child.send("\r")
    status(child)
    child.expect_exact(PROMPT)
    child.send("a\nb\nc\n")  # one write: a paste the terminal did not bracket
    status(child)
    child.expect_exact(PROMPT)
    child.send(f"{PASTE_START}/usr/bin is where\nthe programs are{PASTE_END}\r")
    status(child)
    child.expect_exact(PROMPT)
    msgs = saved_messages(child, tmp_path, "c.json")
    assert [m["content"] for m in msgs if m["role"] == "user"] == [
        "line one\nline two\nline three", "a\nb\nc", "/usr/bin is where\nthe programs are"]
    assert len(msgs) == 6  # three answers, one per paste
    exit_with_ctrl_d(child)


def test_plan_command_and_verbose_show_the_placement_table(cli_env, tmp_path: Path) -> None:
    child = spawn(cli_env, tmp_path)  # one summary line at start (spawn checks it), the table on /plan
    child.sendline("/plan")
    child.expect(TABLE)
    child.expect("routed experts")
    child.expect_exact(PROMPT)
    exit_with_ctrl_d(child)
    child = spawn(cli_env, tmp_path, "--verbose", placement=TABLE)
    exit_with_ctrl_d(child)


STATS_CONTEXT = re.compile(r"context\s+(\d+)/(\d+) tokens")


def stats_context(child) -> tuple[int, int, str]:
    """(/stats context used, its max, the whole /stats text)."""
    child.sendline("/stats")
    child.expect(r"messages [^\n]*\n")  # (skips what a stray Ctrl-C at the prompt printed before it)
    text = child.after
    child.expect(STATS_CONTEXT)
    used, most = int(child.match.group(1)), int(child.match.group(2))
    text += child.before + child.after
    child.expect_exact(PROMPT)
    return used, most, text + child.before


def test_stats_agree_with_the_status_line(cli_env, tmp_path: Path) -> None:
    """/stats' context is the last status line's, also after /clear (0), /load (the loaded conversation's size,
    which the next turn's prompt then holds) and a double Ctrl-C (the KV cache is dropped)."""
    system = "The quick brown fox jumps over the lazy dog. " * 500
    child = spawn(cli_env, tmp_path, "--max-tokens", "4", "--max-context", "8192")
    st = turn(child, "hello")
    assert stats_context(child)[:2] == (st.used, st.max)
    st2 = turn(child, "more")
    assert stats_context(child)[:2] == (st2.used, st2.max)
    command(child, "/save conv.json", "saved 4 messages")
    command(child, "/clear", "conversation cleared")
    used, _, text = stats_context(child)
    assert used == 0 and "last prompt" not in text
    assert re.search(r"messages\s+0 \(0 turns", text) and re.search(r"session total\s+2 turns", text)
    st3 = turn(child, "x")
    assert st3.cached == 0 and stats_context(child)[0] == st3.used
    command(child, "/load conv.json", "loaded 4 messages")
    loaded, _, text = stats_context(child)
    assert loaded > 0, text  # the saved conversation's size (not the KV cache's leftover from the last one)
    st4 = turn(child, "after load")
    assert st4.prefill + st4.cached > loaded and stats_context(child)[0] == st4.used
    exit_with_ctrl_d(child)

    # a second Ctrl-C while a long prompt is computed interrupts the model: the KV cache is dropped, the turn
    # (nothing was said yet) never happened; the status line and /stats say the same context
    child = spawn(cli_env, tmp_path, "--max-tokens", "1", "--max-context", "8192", "--system", system)
    for _ in range(3):  # (two Ctrl-C that reach Python together are one: then it was a plain stop; again)
        child.sendline("hi")
        child.expect_exact("hi")
        time.sleep(1.5)
        child.sendintr()
        time.sleep(0.05)  # the first has reached Python's handler (a stop request), the model is still computing
        child.sendintr()
        child.expect(r"interrupted · (KV cache dropped · )?[^\n]*context (\d+)/(\d+)", timeout=60)
        dropped, used = child.match.group(1) is not None, int(child.match.group(2))
        child.expect_exact(PROMPT)
        s_used, _, text = stats_context(child)
        assert s_used == used
        if dropped:
            break
    assert dropped and used == 0 and "KV cache dropped" in text and re.search(r"kv cache\s+0 tokens", text)
    exit_with_ctrl_d(child)


def test_history_file_is_documented_and_can_be_moved(cli_env, tmp_path: Path) -> None:
    p = subprocess.run(CLI + ["--help"], capture_output=True, text=True, env=cli_env, timeout=60)
    assert "K2LOCAL_HISTORY" in p.stdout and "chat_history" in p.stdout
    hist = tmp_path / "h" / "history"
    env = dict(cli_env, K2LOCAL_HISTORY=str(hist))
    child = spawn(env, tmp_path)
    command(child, "/set seed 3", "seed = 3")
    exit_with_ctrl_d(child)
    assert "/set seed 3" in hist.read_text()
    assert sorted(f.name for f in hist.parent.iterdir()) == ["history"]  # written atomically: no temp file left
    assert hist.stat().st_mode & 0o077 == 0  # private: it holds what was typed
    child = spawn(dict(cli_env, K2LOCAL_HISTORY="off"), tmp_path)
    command(child, "/set seed 4242", "seed = 4242")
    exit_with_ctrl_d(child)
    default = Path(cli_env["K2LOCAL_CACHE"]) / "chat_history"
    assert not default.exists() or "4242" not in default.read_text()
