"""Terminal-chat logic without the terminal: conversation state, multi-line input, slash commands, save/load.

`k2local run` (cli/run.py) draws the UI; everything here is plain Python so it can be tested directly.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from k2local.chat.reasoning import (
    THINK_END,
    THINK_START,
    ReasoningDelta,
    ReasoningStreamParser,
    prompt_opens_reasoning,
    template_thinks,
)
from k2local.errors import K2Error
from k2local.generate import ChatBackend, GenerationResult
from k2local.sampler import SamplingParams

SAVE_FORMAT = "k2local.chat"
SAVE_VERSION = 1
ROLES = ("system", "user", "assistant", "tool")

HELP = '''\
Type a message and press Enter. Commands:
  /help              this help
  /system [TEXT]     show the system prompt, or set it to TEXT ("/system -" removes it)
  /clear             forget the conversation (the system prompt stays)
  /save FILE         write the conversation to FILE as JSON
  /load FILE         read a conversation saved with /save (or a JSON list of messages)
  /stats             speed, tokens reused from the KV cache, context used
  /plan              where the model is: GPU / RAM / disk, sizes, share of expert uses
  /set NAME VALUE    change temperature, top_p, top_k, max_tokens or seed ("/set" lists them)
  /think [on|off|show]  thinking models: show or hide (fold) the reasoning; "show" prints the last one
  /exit              leave (also /quit, /bye, or Ctrl-D)
Multi-line input: end a line with \\ to continue it, or wrap text in """ ... """; pasted lines are one message
(press Enter to send it).
Start a message with // to send a literal leading /.
Ctrl-C stops the answer being written and keeps the conversation; Ctrl-C at the prompt clears the line.'''


class SessionError(K2Error):
    """A chat command or conversation file is invalid (shown to the user as one line)."""


# ----------------------------------------------------------------------------------------------------------------------
# Input


class LineAssembler:
    """Joins typed lines into one message: a trailing backslash continues, \"\"\" opens and closes a block."""

    def __init__(self) -> None:
        self._buf: list[str] = []
        self._block = False

    @property
    def pending(self) -> bool:
        """True while a message is incomplete (show a continuation prompt)."""
        return self._block or bool(self._buf)

    def reset(self) -> None:
        self._buf, self._block = [], False

    def feed(self, line: str) -> str | None:
        """Add one line (without its newline); returns the finished message, or None if more lines are needed."""
        line = line.rstrip("\r\n")
        if self._block:
            stripped = line.rstrip()
            if stripped.endswith('"""'):
                self._buf.append(stripped[:-3])
                return self._finish()
            self._buf.append(line)
            return None
        if not self._buf and line.lstrip().startswith('"""'):
            rest = line.lstrip()[3:]
            if rest.rstrip().endswith('"""'):
                return rest.rstrip()[:-3]
            self._block = True
            if rest:
                self._buf.append(rest)
            return None
        if line.endswith("\\"):
            self._buf.append(line[:-1])
            return None
        self._buf.append(line)
        return self._finish()

    def feed_paste(self, text: str) -> str | None:
        """Several lines that arrived at once (a paste): read as if typed, except that the line breaks inside the
        paste do not send, so what they would have sent is one message (None while a block or a trailing
        backslash still waits for more lines)."""
        done = [m for m in map(self.feed, text.rstrip("\r\n").split("\n")) if m is not None]
        if self.pending:
            self._buf[:0] = done
            return None
        return "\n".join(done)

    def _finish(self) -> str:
        text = "\n".join(self._buf)
        self.reset()
        return text


# ----------------------------------------------------------------------------------------------------------------------
# Conversation


@dataclass
class TurnResult:
    """One answer: its visible text and how it was produced (result is None after a hard interrupt)."""

    text: str
    finish_reason: str  # "stop" | "length" | "cancelled"
    result: GenerationResult | None
    context_used: int  # tokens the conversation takes after this turn (what /stats shows as context)
    context_max: int
    reasoning: str = ""  # a thinking model's reasoning (not part of text)

    def to_json(self, model: str) -> dict[str, Any]:
        """The scriptable form (`k2local run --json`)."""
        r = self.result
        usage = {"prompt_tokens": r.prompt_tokens if r else 0, "completion_tokens": len(r.tokens) if r else 0,
                 "cached_tokens": r.cached_tokens if r else 0}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        timings = {"prefill_s": round(r.prefill_s, 6), "decode_s": round(r.decode_s, 6),
                   "prefill_tokens_per_s": round(r.prefill_tps, 3),
                   "decode_tokens_per_s": round(r.decode_tps, 3)} if r else {}
        message = {"role": "assistant", "content": self.text}
        if self.reasoning:
            message["reasoning_content"] = self.reasoning
        return {"model": model, "message": message,
                "finish_reason": self.finish_reason, "usage": usage, "timings": timings,
                "context": {"used": self.context_used, "max": self.context_max}}


@dataclass
class Totals:
    """Counts over turns (the whole session, or one conversation: /clear and /load start a new one)."""

    turns: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    interrupted: int = 0


@dataclass
class SessionStats:
    """What /stats shows: the conversation, the KV cache, totals over all turns, and the last turn (the numbers of
    its status line; None before the first answer of this conversation)."""

    model: str
    messages: int
    context_used: int  # the same number as the last status line's context (0 after /clear; the file's after /load)
    context_max: int
    kv_cache_bytes: int
    kv_tokens: int  # tokens whose KV is in the cache now
    conversation: Totals  # turns since the conversation began (/clear, /load)
    totals: Totals  # the whole session
    last: TurnResult | None


@dataclass
class ChatSession:
    """A conversation with one engine: messages, system prompt, sampling settings, and the KV-caching generator.

    Each turn renders the whole conversation through the model's chat template; the generator keeps the KV of
    the previous turn and recomputes only what follows the longest common prefix, so a follow-up costs only
    its own tokens (plus any re-tokenization difference in the previous answer).
    """

    engine: ChatBackend  # k2local.engine.Engine, or a stub with its interface
    params: SamplingParams = field(default_factory=SamplingParams)
    system: str | None = None
    ignore_eos: bool = False
    messages: list[dict[str, Any]] = field(default_factory=list)
    last: TurnResult | None = None
    totals: Totals = field(default_factory=Totals)
    conv_totals: Totals = field(default_factory=Totals)
    show_reasoning: bool = True  # /think on|off: whether the terminal shows a thinking model's reasoning

    def __post_init__(self) -> None:
        self.generator = self.engine.new_generator()
        self._answer_ids: dict[int, list[int]] = {}  # message index -> the ids the model generated for it
        self._context_used = 0  # tokens the conversation takes: the status line's and /stats' context

    # -- state ---------------------------------------------------------------------------------------------------------

    def conversation(self) -> list[dict[str, Any]]:
        """Messages as the chat template sees them (system prompt first when set)."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.messages

    @property
    def context_used(self) -> int:
        """Tokens the conversation takes (prompt and answers): after a turn, what its status line says; 0 after
        /clear; the loaded conversation's after /load. Usually also what the KV cache holds, except after a hard
        interrupt (the cache was dropped) or /load (it holds the old conversation until the next turn)."""
        return self._context_used

    def clear(self) -> None:
        """Forget the conversation (keeps the system prompt and sampling settings)."""
        self.messages = []
        self._new_conversation()
        self.generator.reset()

    def _new_conversation(self) -> None:
        self.last = None
        self._answer_ids = {}
        self.conv_totals = Totals()
        self._context_used = self._conversation_tokens()

    def _conversation_tokens(self) -> int:
        """Tokens of the conversation as the template renders it (no generation prompt); 0 when empty."""
        if not self.messages:
            return 0
        try:
            return len(self.engine.chat_ids(self.conversation(), add_generation_prompt=False))
        except Exception:  # noqa: BLE001 (a template that cannot render it says so at the next turn)
            return 0

    # -- a turn --------------------------------------------------------------------------------------------------------

    @property
    def thinks(self) -> bool:
        """A thinking model (its chat template writes ``<think>``): answers are parsed for reasoning."""
        return template_thinks(getattr(self.engine, "template", None))

    def ask(self, text: str, on_text: Callable[[str], None] | None = None,
            should_stop: Callable[[], bool] | None = None,
            on_reasoning: Callable[[str], None] | None = None) -> TurnResult:
        """Send a user message; stream visible text pieces to on_text; append the answer to the conversation.

        A stop request (should_stop) ends the answer early and keeps what was written. A KeyboardInterrupt
        raised inside the model (a second Ctrl-C) does the same but also drops the KV cache, whose state is then
        unknown. Special tokens (end-of-turn included) never reach on_text or the stored answer.

        A thinking model's reasoning (``<think>...</think>``, or from the start when the prompt opened it; see
        :mod:`k2local.chat.reasoning`) goes to on_reasoning instead, is kept apart in ``TurnResult.reasoning``
        and is stored on the answer as ``reasoning_content`` (the chat template decides what earlier turns'
        reasoning the model sees again). A model that does not think is unaffected.
        """
        self.messages.append({"role": "user", "content": text})
        try:
            ids = self.prompt_ids()
        except KeyboardInterrupt:
            self.messages.pop()
            raise
        except Exception as e:
            self.messages.pop()
            raise SessionError(f"cannot render the chat template: {e}") from None
        tok = self.engine.tokenizer
        thinker = None
        keep: frozenset[int] = frozenset()
        if self.thinks:  # a template that opens <think> in the prompt writes it, so it thinks
            thinker = ReasoningStreamParser(start_in_reasoning=prompt_opens_reasoning(tok.decode(ids[-16:])))
            keep = frozenset(i for i in map(tok.token_to_id, (THINK_START, THINK_END))
                             if i is not None and i in tok.skip_ids)
        stream = (tok.stream_decoder(skip_special_tokens=True, keep=keep) if keep
                  else tok.stream_decoder(skip_special_tokens=True))
        pieces: list[str] = []
        thoughts: list[str] = []
        stops = frozenset() if self.ignore_eos else frozenset(self.engine.stop_ids)

        def show(piece: str) -> None:
            if piece:
                pieces.append(piece)
                if on_text:
                    on_text(piece)

        def route(events: Any) -> None:
            for ev in events:
                if isinstance(ev, ReasoningDelta):
                    thoughts.append(ev.text)
                    if on_reasoning:
                        on_reasoning(ev.text)
                else:
                    show(ev.text)

        def emit(piece: str) -> None:
            if not piece:
                return
            if thinker is None:
                show(piece)
            else:
                route(thinker.feed(piece))

        generated = [0]

        def on_token(tid: int) -> bool:
            generated[0] += 1
            if tid not in stops:
                emit(stream.feed(tid))
            return False

        params = SamplingParams(**{**asdict(self.params), "stop_ids": stops})
        result: GenerationResult | None = None
        try:
            result = self.generator.generate(ids, params, stops, on_token=on_token, should_stop=should_stop)
        except KeyboardInterrupt:
            self.generator.reset()
        except Exception:
            self.messages.pop()
            raise
        emit(stream.flush())
        if thinker is not None:
            route(thinker.finish())
        answer, reasoning = "".join(pieces), "".join(thoughts)
        reason = result.finish_reason if result else "cancelled"
        if reason == "cancelled" and not answer and not reasoning:
            self.messages.pop()  # interrupted before anything was said: the turn never happened
        else:
            if result is not None and not reasoning:
                self._answer_ids[len(self.messages)] = [t for t in result.tokens if t not in stops]
            msg: dict[str, Any] = {"role": "assistant", "content": answer}
            if reasoning:
                msg["reasoning_content"] = reasoning
            self.messages.append(msg)
        # the context: what the KV cache holds after the turn; after a hard interrupt (the cache was dropped) the
        # prompt plus what was generated, or the conversation as it was when the turn was dropped
        if result is not None:
            used = len(self.generator.tokens)
        elif self.messages and self.messages[-1]["role"] == "assistant":
            used = len(ids) + generated[0]
        else:
            used = self._context_used
        turn = TurnResult(answer, reason, result, used, self.engine.max_context, reasoning)
        self._context_used = used
        self._count(turn)
        return turn

    def prompt_ids(self) -> list[int]:
        """The conversation as token ids, with earlier answers as the exact ids the model generated.

        Re-tokenizing an answer's text can split it differently from how the model produced it (and drops
        hidden special tokens), which would end the KV-cache prefix match inside that answer; splicing the
        original ids keeps the whole history reusable. Used only when the template inserts each answer's text
        verbatim and the ids decode to that text; otherwise the text is tokenized as usual.
        """
        conv = self.conversation()
        ids = self.engine.chat_ids(conv)
        if not self._answer_ids:
            return ids
        tok, render = self.engine.tokenizer, self.engine.template.render
        offset = len(conv) - len(self.messages)
        marks = {i + offset: f"\ue000{i}\ue001" for i, a in self._answer_ids.items()
                 if i < len(self.messages) and tok.decode(a, skip_special_tokens=True) == self.messages[i]["content"]}
        if not marks:
            return ids
        masked = render([dict(m, content=marks[j]) if j in marks else m for j, m in enumerate(conv)],
                        tools=None, add_generation_prompt=True)
        full, check = render(conv, tools=None, add_generation_prompt=True), masked
        for j, mark in marks.items():
            check = check.replace(mark, conv[j]["content"])
        if check != full:
            return ids
        spliced: list[int] = []
        rest = masked
        for j, mark in marks.items():
            head, found, rest = rest.partition(mark)
            if not found or mark in rest:
                return ids
            spliced += tok.encode(head, allow_special=True) + self._answer_ids[j - offset]
        return spliced + tok.encode(rest, allow_special=True)

    def _count(self, turn: TurnResult) -> None:
        for t in (self.totals, self.conv_totals):
            t.turns += 1
            t.interrupted += turn.finish_reason == "cancelled"
            if turn.result:
                r = turn.result
                t.prompt_tokens += r.prompt_tokens
                t.cached_tokens += r.cached_tokens
                t.completion_tokens += len(r.tokens)
                t.prefill_s += r.prefill_s
                t.decode_s += r.decode_s
        self.last = turn

    # -- files ---------------------------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        p = self.params
        return {"format": SAVE_FORMAT, "version": SAVE_VERSION, "model": self.engine.name,
                "system": self.system, "messages": self.messages,
                "sampling": {"temperature": p.temperature, "top_p": p.top_p, "top_k": p.top_k,
                             "max_tokens": p.max_tokens, "seed": p.seed}}

    def save(self, path: str | Path) -> Path:
        """Write the conversation as JSON (atomically)."""
        path = Path(path).expanduser()
        data = json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n"
        if not path.parent.is_dir():  # a missing directory is more likely a typo than a wish: never created
            what = "is not a directory" if path.parent.exists() else "does not exist"
            raise SessionError(f"{path}: cannot write: directory {path.parent} {what} (nothing written)")
        if path.is_dir():
            raise SessionError(f"{path}: is a directory; give a file name")
        tmp = None
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(data)
            os.replace(tmp, path)
            tmp = None
        except OSError as e:
            hint = "; free some space and /save again" if e.errno == errno.ENOSPC else ""
            raise SessionError(f"{path}: cannot write: {e.strerror or e}{hint} (nothing written)") from None
        finally:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
        return path

    def load(self, path: str | Path) -> int:
        """Replace the conversation with one read from JSON; returns the number of messages loaded."""
        path = Path(path).expanduser()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise SessionError(f"{path}: no such file") from None
        except OSError as e:
            raise SessionError(f"{path}: cannot read: {e.strerror or e}") from None
        except UnicodeDecodeError as e:
            raise SessionError(f"{path}: cannot read: not UTF-8 text ({e.reason})") from None
        except json.JSONDecodeError as e:
            raise SessionError(f"{path}: not valid JSON: {e}") from None
        system, messages = parse_conversation(data, str(path))
        self.messages = messages
        if system is not None or isinstance(data, dict) and "system" in data:
            self.system = system
        self._new_conversation()
        return len(messages)

    # -- commands ------------------------------------------------------------------------------------------------------

    def stats(self) -> SessionStats:
        """Numbers for /stats."""
        return SessionStats(self.engine.name, len(self.messages), self.context_used, self.engine.max_context,
                            self.generator.cache.nbytes(), len(self.generator.tokens), replace(self.conv_totals),
                            replace(self.totals), self.last)

    def set_param(self, name: str, value: str) -> str:
        """/set NAME VALUE: change one sampling setting (validated)."""
        kinds: dict[str, Callable[[str], Any]] = {"temperature": float, "top_p": float, "top_k": int,
                                                  "max_tokens": int, "seed": _int_or_none}
        name = name.replace("-", "_")
        if name not in kinds:
            raise SessionError(f"unknown setting {name!r}; one of {', '.join(kinds)}")
        try:
            converted = kinds[name](value)
        except ValueError:
            want = "a number" if kinds[name] is float else "a whole number" + (" or none" if name == "seed" else "")
            raise SessionError(f"{name}: {value!r} is not {want}") from None
        try:
            new = SamplingParams(**{**asdict(self.params), name: converted})
            new.validate()
        except ValueError as e:
            raise SessionError(f"{name}: {e}") from None
        self.params = new
        return f"{name} = {getattr(new, name)}"

    def settings(self) -> str:
        p = self.params
        return (f"temperature {p.temperature}  top_p {p.top_p}  top_k {p.top_k}  max_tokens {p.max_tokens}  "
                f"seed {p.seed}")


def _int_or_none(v: str) -> int | None:
    return None if v.lower() in ("none", "random", "-") else int(v)


def parse_conversation(data: Any, where: str = "conversation") -> tuple[str | None, list[dict[str, Any]]]:
    """A saved conversation (our format, {"messages": [...]}, or a bare list) -> (system prompt, messages)."""
    if isinstance(data, dict):
        if data.get("format", SAVE_FORMAT) != SAVE_FORMAT:
            raise SessionError(f"{where}: unknown format {data.get('format')!r}")
        system, msgs = data.get("system"), data.get("messages")
    else:
        system, msgs = None, data
    if not isinstance(msgs, list):
        raise SessionError(f"{where}: expected a list of messages")
    if system is not None and not isinstance(system, str):
        raise SessionError(f"{where}: 'system' must be a string")
    out: list[dict[str, Any]] = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise SessionError(f"{where}: message {i} needs a role ({', '.join(ROLES)})")
        if not isinstance(m.get("content"), (str, list, type(None))):
            raise SessionError(f"{where}: message {i} has content that is not text")
        out.append(dict(m))
    if out and out[0]["role"] == "system" and isinstance(out[0].get("content"), str):
        system = out.pop(0)["content"]
    return system, out


@dataclass
class CommandOutcome:
    """What a slash command wants shown: text lines, and whether to leave."""

    text: str = ""
    exit: bool = False
    error: bool = False
    loaded: bool = False
    show_plan: bool = False  # /plan: the caller draws the placement table


EXIT_COMMANDS = ("/exit", "/quit", "/bye")


def is_command(message: str) -> bool:
    """A message that is a slash command (// escapes a literal slash)."""
    return message.startswith("/") and not message.startswith("//")


def literal(message: str) -> str:
    """The text to send for a non-command message (// -> /)."""
    return message[1:] if message.startswith("//") else message


def run_command(session: ChatSession, message: str) -> CommandOutcome:
    """Execute one slash command against the session."""
    head, _, arg = message.strip().partition(" ")
    cmd, arg = head.lower(), arg.strip()
    try:
        if cmd in EXIT_COMMANDS:
            return CommandOutcome(exit=True)
        if cmd in ("/help", "/?"):
            return CommandOutcome(HELP)
        if cmd == "/system":
            if not arg:
                return CommandOutcome(f"system prompt: {session.system}" if session.system
                                      else "no system prompt (the model's template default applies)")
            session.system = None if arg == "-" else arg
            return CommandOutcome("system prompt removed" if arg == "-" else "system prompt set")
        if cmd == "/clear":
            session.clear()
            return CommandOutcome("conversation cleared")
        if cmd == "/save":
            if not arg:
                raise SessionError("usage: /save FILE")
            path = session.save(arg)
            return CommandOutcome(f"saved {len(session.messages)} messages to {path}")
        if cmd == "/load":
            if not arg:
                raise SessionError("usage: /load FILE")
            n = session.load(arg)
            return CommandOutcome(f"loaded {n} messages from {arg}", loaded=True)
        if cmd == "/stats":
            return CommandOutcome(format_stats(session.stats()))
        if cmd == "/plan":
            return CommandOutcome(show_plan=True)
        if cmd == "/think":
            return _think_command(session, arg.lower())
        if cmd == "/set":
            if not arg:
                return CommandOutcome(session.settings())
            name, _, value = arg.partition(" ")
            if not value.strip():
                raise SessionError("usage: /set NAME VALUE")
            return CommandOutcome(session.set_param(name, value.strip()))
    except SessionError as e:
        return CommandOutcome(str(e), error=True)
    return CommandOutcome(f"unknown command {head}; /help lists the commands", error=True)


def _think_command(session: ChatSession, arg: str) -> CommandOutcome:
    """/think [on|off|show]: show or fold a thinking model's reasoning; "show" prints the last answer's."""
    if arg in ("", "toggle"):
        session.show_reasoning = not session.show_reasoning
    elif arg in ("on", "off"):
        session.show_reasoning = arg == "on"
    elif arg in ("show", "last"):
        last = session.last.reasoning if session.last else ""
        return CommandOutcome(last or "no reasoning in the last answer")
    else:
        raise SessionError("usage: /think [on|off|show]")
    note = "" if session.thinks else " (this model's template does not think; nothing to show)"
    return CommandOutcome(("reasoning shown" if session.show_reasoning else
                           "reasoning hidden (folded to one line; /think show prints the last one)") + note)


def format_stats(s: SessionStats) -> str:
    """/stats as aligned lines; the context and the last turn's numbers are those of the last status line."""
    c, t = s.conversation, s.totals
    lines = [f"model             {s.model}",
             f"messages          {s.messages} ({c.turns} turns, {c.interrupted} interrupted)",
             f"context           {s.context_used}/{s.context_max} tokens",
             f"kv cache          {s.kv_tokens} tokens, {s.kv_cache_bytes / 2**20:.1f} MiB allocated",
             f"session total     {t.turns} turns, prompt {t.prompt_tokens} tokens (cached {t.cached_tokens}), "
             f"generated {t.completion_tokens}"]
    turn = s.last
    r = turn.result if turn else None
    if r:
        lines += [f"last prompt       {r.prompt_tokens} tokens, cached {r.cached_tokens}, "
                  f"prefilled {r.prompt_tokens - r.cached_tokens} at {r.prefill_tps:.1f} tok/s",
                  f"last answer       {len(r.tokens)} tokens at {r.decode_tps:.1f} tok/s ({r.finish_reason})"]
    elif turn:
        lines.append("last answer       interrupted, KV cache dropped (the next turn computes the prompt again)")
    return "\n".join(lines)


def status_line(turn: TurnResult) -> str:
    """One line after each answer: prefill and decode speed, reuse, context used / max."""
    r = turn.result
    ctx = f"context {turn.context_used}/{turn.context_max}"
    if r is None:
        return f"interrupted · KV cache dropped · {ctx}"
    new = r.prompt_tokens - r.cached_tokens
    parts = [f"prefill {new} tok {r.prefill_tps:.1f} tok/s" + (f" ({r.cached_tokens} cached)" if r.cached_tokens
                                                               else ""),
             f"decode {len(r.tokens)} tok {r.decode_tps:.1f} tok/s", ctx]
    if turn.finish_reason == "cancelled":
        parts.insert(0, "interrupted")
    elif turn.finish_reason == "length":
        parts.append("stopped at the token limit")
    return " · ".join(parts)
