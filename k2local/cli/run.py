"""`k2local run [MODEL]`: chat in the terminal (or answer piped input and exit)."""
from __future__ import annotations

import contextlib
import json
import os
import re
import select
import signal
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, TextIO

import click
from rich.console import Console, Group
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from k2local.cli.options import context_notes, gpu_notes, placement_options, random_weights_notice
from k2local.errors import USER_ERRORS, K2Error

if TYPE_CHECKING:
    from k2local.cli.chat_session import ChatSession, TurnResult
    from k2local.engine import Engine, LoadOptions

# The function-local imports below (`noqa: PLC0415`) defer torch, which k2local.cli.chat_session, .engine, .sampler,
# .tiny and .checkpoint import (about 2 s): `k2local run --help` and argument errors stay instant.

RANDOM_NOTICE = ("No MODEL given: running the built-in tiny checkpoint. Its weights are RANDOM, so its answers "
                 "are gibberish; it is here to try k2local. Pass a checkpoint path to chat with a real model.")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\x80-\x9f]")  # keep \t and \n; never let the model drive the tty
PASTE_GAP_S = 0.01  # a line already waiting this soon after the last one is part of a paste (no bracketed paste)
HISTORY_ENV = "K2LOCAL_HISTORY"
_SAMPLING_FLAGS = {"temperature": "--temperature", "top_p": "--top-p", "top_k": "--top-k",
                   "max_tokens": "--max-tokens"}


@click.command("run", short_help="Chat with a model in the terminal (or answer piped input).")
@click.argument("model", required=False, type=click.Path(path_type=Path))
@click.option("--temperature", type=float, default=0.6, show_default=True, help="0 = greedy.")
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--top-k", type=int, default=0, show_default=True, help="0 = off.")
@click.option("--max-tokens", type=int, default=2048, show_default=True, help="Longest answer.")
@click.option("--seed", type=int, default=None, help="Seed for reproducible sampling.")
@click.option("--system", "system", default=None, help="System prompt.")
@click.option("--json", "json_out", is_flag=True, help="Print each answer as one JSON object (for scripts).")
@placement_options
@click.option("--ignore-eos", is_flag=True, help="Keep generating past end-of-turn tokens (benchmarks).")
@click.option("-v", "--verbose", is_flag=True,
              help="The full placement table at start (/plan in the chat shows it too); with piped input also "
                   "loading and speed on stderr.")
def run(model: Path | None, temperature: float, top_p: float, top_k: int, max_tokens: int, seed: int | None,
        system: str | None, json_out: bool, max_context: int | None, gpu_mem: float | None, ram: float | None,
        experts_on: str | None, cpu_only: bool, ignore_eos: bool, verbose: bool) -> None:
    """Chat with MODEL (a checkpoint directory or GGUF file) in the terminal.

    Without MODEL it runs the built-in tiny checkpoint (random weights). With piped input
    (echo "question" | k2local run MODEL) it prints the answer and exits. Type /help in the chat.

    \b
    Pasted lines are one message (press Enter to send it).
    Up-arrow history is kept in $K2LOCAL_CACHE/chat_history (default ~/.cache/k2local/chat_history);
    K2LOCAL_HISTORY=FILE keeps it elsewhere, K2LOCAL_HISTORY=off keeps none.
    """
    if model is not None and not model.exists():
        raise K2Error(f"{model}: no such file or directory")
    # torch loads with these (about 2 s): imported here so --help and the errors above are instant
    from k2local.cli.chat_session import ChatSession  # noqa: PLC0415
    from k2local.engine import LoadOptions  # noqa: PLC0415
    from k2local.sampler import SamplingParams  # noqa: PLC0415

    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=max_tokens, seed=seed)
    try:
        params.validate()
    except ValueError as e:  # "top_p must be in (0, 1], got 2.0": blame the flag
        name = str(e).split(" ", 1)[0]
        raise click.BadParameter(str(e), param_hint=repr(_SAMPLING_FLAGS.get(name, name))) from None
    interactive = sys.stdin.isatty()
    question = None if interactive else _read_stdin()  # after the flags: a bad one is said before stdin is read
    err = Console(stderr=True, highlight=False)
    show_loading = interactive or verbose or err.is_terminal

    opts = LoadOptions(max_context=max_context, cpu_only=cpu_only, gpu_mem=gpu_mem, ram=ram, experts_on=experts_on)
    path, random_weights = _resolve_model(model, err if show_loading else None)
    if random_weights:
        err.print(RANDOM_NOTICE, style="bold yellow")
    for note in gpu_notes(gpu_mem, cpu_only):
        err.print(f"note: {note}", style="yellow", markup=False, soft_wrap=True)
    engine, loaded_bytes = _load(path, opts, err, show_loading)
    for note in context_notes(max_context, engine.max_context, engine.source.config.max_position_embeddings):
        err.print(f"note: {note}", style="yellow", markup=False, soft_wrap=True)
    if not random_weights and engine.source.config.random_weights:
        random_weights = True
        err.print(f"warning: {random_weights_notice(str(path))}", style="bold yellow", markup=False, soft_wrap=True)
    if verbose:
        err.print(plan_summary(engine, opts, loaded_bytes))
    elif show_loading:
        err.print(placement_line(engine, loaded_bytes), style="dim", markup=False, soft_wrap=True)
    session = ChatSession(engine, params, system=system, ignore_eos=ignore_eos)
    if question is not None:
        _answer_once(session, question, json_out, random_weights, err if verbose else None)
    else:
        _chat(session, json_out, random_weights, lambda: plan_summary(engine, opts, loaded_bytes))


# ----------------------------------------------------------------------------------------------------------------------
# Loading


def _read_stdin() -> str:
    try:
        text = sys.stdin.read()
    except UnicodeDecodeError as e:
        raise K2Error(f"stdin is not valid text in {sys.stdin.encoding}: {e.reason}") from None
    if not text.strip():
        raise K2Error('no input on stdin; pipe a question (echo "hi" | k2local run MODEL) or run it in a terminal')
    return text.strip()


def _resolve_model(model: Path | None, console: Console | None) -> tuple[Path, bool]:
    """(checkpoint path, weights are random): the built-in tiny checkpoint when MODEL is omitted."""
    if model is not None:
        return model, False
    from k2local.tiny import default_tiny_path  # noqa: PLC0415

    if console is None:
        return default_tiny_path(), True
    with console.status("preparing the built-in tiny checkpoint (generated once, then cached)"):
        return default_tiny_path(), True


def _count_tensors(path: Path) -> int | None:
    """The progress bar's total: tensors outside the routed experts plus one step per routed expert."""
    try:
        from k2local.weights.hf_checkpoint import expected_tensor_names, open_checkpoint  # noqa: PLC0415

        cfg = open_checkpoint(path).config
        routed = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers)) * cfg.n_routed_experts
        return sum(".mlp.experts." not in n for n in expected_tensor_names(cfg)) + routed
    except K2Error:
        raise
    except Exception:  # noqa: BLE001 (only the bar's total is lost)
        return None


def _load(path: Path, opts: LoadOptions, console: Console, show: bool) -> tuple[Engine, int]:
    """Engine.load with a progress bar (tensors, GB, time) and a one-line summary; (engine, bytes loaded)."""
    from k2local.engine import Engine  # noqa: PLC0415

    total = _count_tensors(path)
    seen = {"n": 0, "bytes": 0}
    t0 = time.perf_counter()
    progress = Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(),
                        MofNCompleteColumn(), TextColumn("tensors"), TextColumn("{task.fields[gb]:.2f} GB"),
                        TimeElapsedColumn(), console=console, transient=True, disable=not show)
    task = progress.add_task(f"loading {path.name}", total=total, gb=0.0)

    def on_tensor(name: str, nbytes: int) -> None:
        seen["n"] += 1
        seen["bytes"] += nbytes
        grow = {"total": seen["n"]} if total is not None and seen["n"] > total else {}
        progress.update(task, completed=seen["n"], gb=seen["bytes"] / 1e9, **grow)

    try:
        with progress:
            engine = Engine.load(path, opts, progress=on_tensor)
    except USER_ERRORS:
        raise
    except OSError as e:  # file problems: the file and the reason, not Python's "[Errno 21] ..."
        where = e.filename or path
        raise K2Error(f"{where}: cannot read ({e.strerror or e})") from None
    except ValueError as e:  # tokenizer / chat template problems
        raise K2Error(f"cannot load {path}: {e}") from None
    if show:
        console.print(f"loaded {engine.name}: {seen['n']} tensors, {seen['bytes'] / 1e9:.2f} GB "
                      f"in {time.perf_counter() - t0:.1f} s", style="bold", markup=False, soft_wrap=True)
    return engine, seen["bytes"]


def plan_summary(engine: Engine, opts: LoadOptions, loaded_bytes: int = 0) -> Any:
    """What is where (GPU / RAM / disk): offload's plan when the expert backend has one, else from the engine
    (``loaded_bytes``: what loading read, the size shown for the non-expert weights)."""
    backend = engine.model.experts
    plan = getattr(backend, "plan", None)  # offload's backends carry their placement plan; DenseExperts has none
    if plan is not None:
        try:
            from k2local.cli.plan import plan_table  # noqa: PLC0415 (offload's planner imports torch)

            notes = [f"[yellow]note:[/] {n}" for n in plan.notes]
            return Group(plan_table(plan), *notes)
        except Exception:  # noqa: BLE001 (a summary is not worth failing the chat for)
            pass
    model = engine.model
    dev = model.device.type
    where = "GPU" if dev == "cuda" else "RAM"
    table = Table(title=f"placement: {engine.name}  ({dev}, {str(model.dtype).replace('torch.', '')})",
                  title_justify="left")
    for col in ("tier", "holds", "size"):
        table.add_column(col)
    table.add_row(where, f"attention, dense and shared weights ({str(model.dtype).replace('torch.', '')})",
                  _gb(loaded_bytes))
    ex_bytes, ex_dev = _tensor_bytes(getattr(backend, "experts", None))
    ex_where = "GPU" if ex_dev == "cuda" else "RAM"
    table.add_row(ex_where, f"routed experts, all resident ({type(backend).__name__})", _gb(ex_bytes))
    table.add_row(where, f"KV cache, up to {engine.max_context} tokens", _gb(_kv_bytes(engine)))
    table.add_row("disk", "nothing read during generation", "")
    return table


def placement_line(engine: Engine, loaded_bytes: int = 0) -> str:
    """One line of what is where, for the start of a chat (the table: /plan or --verbose), e.g. "placement: float32
    on CPU (2 threads) · weights 20.1 MiB in RAM · experts RAM 19.3 MiB (100% of uses) · KV cache 24.0 MiB for 8192
    tokens · /plan shows the table"."""
    import torch  # noqa: PLC0415 (deferred: see the note at the top; loaded by now)

    from offload.planner import human  # noqa: PLC0415

    model, backend = engine.model, engine.model.experts
    dtype = str(model.dtype).replace("torch.", "")
    on_gpu = model.device.type == "cuda"
    where = f"GPU ({torch.cuda.get_device_name(model.device)})" if on_gpu else \
        f"CPU ({_threads(torch.get_num_threads())})"
    plan = getattr(backend, "plan", None)
    if plan is not None:
        experts = []
        if plan.device_experts:
            experts.append(f"GPU {human(plan.device_expert_bytes)} ({plan.p_device:.0%} of uses)")
        if plan.experts_on == "ram":
            experts.append(f"RAM {human(plan.store_bytes)} ({plan.p_ram:.0%} of uses)")
        else:
            experts += [f"RAM cache {human(plan.store_bytes)} ({plan.p_ram:.0%} of uses)",
                        f"disk {human(plan.disk_bytes)} ({plan.p_disk:.0%} of uses)"]
        weights, kv = plan.resident_bytes, plan.kv_bytes
    else:
        ex_bytes, ex_dev = _tensor_bytes(getattr(backend, "experts", None))
        experts = [f"{'GPU' if ex_dev == 'cuda' else 'RAM'} {human(ex_bytes)} (100% of uses)"]
        weights, kv = loaded_bytes, _kv_bytes(engine)
    return (f"placement: {dtype} on {where} · weights {human(weights)} in {'GPU memory' if on_gpu else 'RAM'} · "
            f"experts {', '.join(experts)} · KV cache {human(kv)} for {engine.max_context} tokens · "
            "/plan shows the table")


def _kv_bytes(engine: Engine) -> int:
    """The KV cache of a full context window (MLA: the compressed latent and the rope key per layer and token)."""
    cfg, model = engine.model.cfg, engine.model
    return cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * model.dtype.itemsize \
        * engine.max_context


def _threads(n: int) -> str:
    return f"{n} thread" + ("" if n == 1 else "s")


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e7 else f"{n / 1e6:.1f} MB"


def _tensor_bytes(obj: Any) -> tuple[int, str]:
    """Total bytes and device type of the tensors inside nested dicts/lists/tuples."""
    import torch  # noqa: PLC0415 (deferred: see the note at the top; loaded by now)

    total, dev = 0, "cpu"
    stack = [obj]
    while stack:
        o = stack.pop()
        if isinstance(o, dict):
            stack.extend(o.values())
        elif isinstance(o, (list, tuple)):
            stack.extend(o)
        elif isinstance(o, torch.Tensor):
            total += o.numel() * o.element_size()
            dev = o.device.type
    return total, dev


# ----------------------------------------------------------------------------------------------------------------------
# Non-interactive


def _answer_once(session: ChatSession, question: str, json_out: bool, random_weights: bool,
                 err: Console | None) -> None:
    """Piped input: one question, the answer on stdout, exit."""
    from k2local.cli.chat_session import status_line  # noqa: PLC0415

    out = sys.stdout
    if json_out:
        turn = session.ask(question)
        out.write(json.dumps(_json(turn, session, random_weights), ensure_ascii=False) + "\n")
    else:
        writer = _TextWriter(out, sanitize=out.isatty())
        # a thinking model's reasoning is not part of the answer on stdout; with -v it goes to stderr
        view = _ThinkingView(_TextWriter(sys.stderr, sanitize=True), shown=True, dim=sys.stderr.isatty()) \
            if err is not None else None
        turn = session.ask(question, on_text=writer.write, on_reasoning=view.reasoning if view else None)
        if view is not None:
            view.end()
        writer.end()
    out.flush()
    if err is not None:
        err.print(status_line(turn), style="dim", soft_wrap=True)


def _json(turn: TurnResult, session: ChatSession, random_weights: bool) -> dict[str, Any]:
    d = turn.to_json(session.engine.name)
    d["random_weights"] = random_weights
    return d


# ----------------------------------------------------------------------------------------------------------------------
# Interactive


class _TextWriter:
    """Streams answer text to a terminal as it comes, remembering whether the cursor is at a line start."""

    def __init__(self, out: TextIO, sanitize: bool = True):
        self.out, self.sanitize, self.at_line_start = out, sanitize, True

    def write(self, piece: str) -> None:
        if self.sanitize:
            piece = _CONTROL.sub("\N{REPLACEMENT CHARACTER}", piece)
        if piece:
            self.out.write(piece)
            self.out.flush()
            self.at_line_start = piece.endswith("\n")

    def end(self) -> None:
        if not self.at_line_start:
            self.out.write("\n")
            self.at_line_start = True
        self.out.flush()


_DIM, _UNDIM, _ERASE_LINE = "\x1b[2m", "\x1b[22m", "\r\x1b[K"


class _ThinkingView:
    """A thinking model's reasoning as it streams, before the answer: dimmed, or (``shown`` False, ``/think off``)
    folded to one line that says how long the model thought (``/think show`` prints it afterwards)."""

    def __init__(self, writer: _TextWriter, shown: bool, dim: bool):
        self.writer, self.shown, self.dim = writer, shown, dim
        self.open = False  # reasoning is being written
        self.words = 0

    def reasoning(self, piece: str) -> None:
        if not self.open:
            self.open = True
            if not self.shown:
                self._raw(self._fold("thinking…"))
        self.words += len(piece.split())
        if self.shown:
            self._raw(_DIM if self.dim else "")
            self.writer.write(piece)
            self._raw(_UNDIM if self.dim else "")

    def text(self, piece: str) -> None:
        """Answer text: closes the reasoning first (a line break, or the folded line's final form)."""
        if self.open:
            self.end()
        self.writer.write(piece)

    def end(self) -> None:
        if not self.open:
            return
        self.open = False
        if self.shown:
            self.writer.end()
            self._raw("\n")
        else:
            summary = self._fold(f"thought for {self.words} words")
            self._raw(_ERASE_LINE + summary if self.dim else "")
            self._raw("\n")
        self.writer.at_line_start = True

    def _fold(self, what: str) -> str:
        line = f"⋯ {what} (hidden; /think on shows reasoning, /think show the last)"
        return f"{_DIM}{line}{_UNDIM}" if self.dim else line

    def _raw(self, s: str) -> None:
        if s:
            self.writer.out.write(s)
            self.writer.out.flush()


def history_path() -> Path | None:
    """Where the chat's up-arrow history is kept: $K2LOCAL_HISTORY (``off`` or empty: nowhere), else
    $K2LOCAL_CACHE/chat_history (default ~/.cache/k2local/chat_history)."""
    env = os.environ.get(HISTORY_ENV)
    if env is not None:
        return None if env.strip().lower() in ("", "off", "none", "0") else Path(env).expanduser()
    return Path(os.environ.get("K2LOCAL_CACHE", Path.home() / ".cache" / "k2local")) / "chat_history"


def _setup_readline() -> Any:
    """Line editing, bracketed paste and up-arrow history (persisted across sessions) through the stdlib
    readline."""
    try:
        import readline  # noqa: PLC0415 (optional: some Pythons are built without it)
    except ImportError:
        return None
    if "libedit" not in (readline.__doc__ or ""):
        # Python turns GNU readline's bracketed paste off; on, a pasted block lands in the line whole (the
        # terminal wraps it in ESC[200~ ... ESC[201~) and Enter sends it as one message, as in a shell
        readline.parse_and_bind("set enable-bracketed-paste on")
    path = history_path()
    if path is not None:
        with contextlib.suppress(OSError):
            readline.read_history_file(path)
    readline.set_history_length(2000)
    return readline


def _save_history(readline: Any) -> None:
    """Write the history atomically (a temp file beside it, private to the user), or leave the old one."""
    path = history_path()
    if readline is None or path is None:
        return
    import tempfile  # noqa: PLC0415

    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        readline.write_history_file(tmp)
        os.replace(tmp, path)
        tmp = None
    except OSError:
        pass
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _input_waiting(timeout: float = PASTE_GAP_S) -> bool:
    """More typed input is already there (a paste that arrives as lines, not bracketed)."""
    try:
        return bool(select.select([sys.stdin], [], [], timeout)[0])
    except (OSError, ValueError):
        return False


def _read_lines(prompt: str) -> str:
    """One line from the terminal and any lines that arrived with it: with bracketed paste a pasted block comes
    back as one line holding newlines; without it, the lines of a paste are already waiting when the first
    returns. Several lines are joined with newlines."""
    lines = [input(prompt)]
    try:
        while _input_waiting():
            lines.append(input(""))
    except (EOFError, KeyboardInterrupt):  # Ctrl-C just after Enter: the message is sent, not lost
        pass
    return "\n".join(lines)


def _chat(session: ChatSession, json_out: bool, random_weights: bool, plan: Callable[[], Any]) -> None:
    """The interactive loop: read a message (multi-line and paste aware), run a command or a turn, repeat until
    /exit. ``plan`` makes the placement table that /plan shows."""
    from k2local.cli.chat_session import LineAssembler, is_command, literal, run_command  # noqa: PLC0415

    con = Console(highlight=False)
    eng = session.engine
    con.print(f"[bold]k2local[/] · {eng.name} · context {eng.max_context} tokens · "
              "/help for commands · Ctrl-D to exit", soft_wrap=True)
    if random_weights:
        con.print("(random weights: expect gibberish)", style="yellow")
    # An interactive chat wants Ctrl-C even when it was started with SIGINT ignored (Python then leaves it ignored:
    # e.g. a background job of a non-interactive shell, as a CI script may be): only the answer's own handler
    # (_turn) got it, and a Ctrl-C at the prompt did nothing.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    rl = _setup_readline()
    asm = LineAssembler()
    try:
        while True:
            try:
                text = _read_lines("... " if asm.pending else ">>> ")
            except EOFError:
                con.print()
                break
            except KeyboardInterrupt:
                asm.reset()
                con.print("\n(Ctrl-C: input cleared; Ctrl-D or /exit leaves)", style="dim")
                continue
            pasted = "\n" in text.rstrip("\r\n")
            message = asm.feed_paste(text) if pasted else asm.feed(text)
            if message is None or not message.strip():
                continue
            if is_command(message) and not pasted:  # pasted text is sent as it is, even when it starts with /
                outcome = run_command(session, message)
                if outcome.exit:
                    break
                if outcome.show_plan:
                    con.print(plan())
                    continue
                con.print(outcome.text, style="red" if outcome.error else None, markup=False, soft_wrap=True)
                if outcome.loaded:
                    _show_conversation(con, session)
                continue
            _turn(con, session, literal(message), json_out, random_weights)
    finally:
        _save_history(rl)


def _turn(con: Console, session: ChatSession, text: str, json_out: bool, random_weights: bool) -> None:
    """One answer, streamed; first Ctrl-C stops it gracefully, a second one interrupts the model mid-step."""
    from k2local.cli.chat_session import status_line  # noqa: PLC0415

    stop = threading.Event()

    def on_sigint(signum: int, frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    writer = _TextWriter(sys.stdout)
    view = _ThinkingView(writer, session.show_reasoning, dim=sys.stdout.isatty())
    turn: TurnResult | None = None
    old = signal.signal(signal.SIGINT, on_sigint)
    try:
        turn = session.ask(text, on_text=None if json_out else view.text, should_stop=stop.is_set,
                           on_reasoning=None if json_out else view.reasoning)
    except USER_ERRORS as e:
        view.end()
        writer.end()
        con.print(f"error: {e}", style="red", markup=False, soft_wrap=True)
        if "context" in str(e):
            con.print("/clear starts a new conversation; --max-context raises the limit", style="dim")
    except KeyboardInterrupt:
        view.end()
        writer.end()
        con.print("interrupted", style="dim")
    finally:
        signal.signal(signal.SIGINT, old)
    view.end()
    writer.end()
    if turn is None:
        return
    if json_out:
        sys.stdout.write(json.dumps(_json(turn, session, random_weights), ensure_ascii=False) + "\n")
        sys.stdout.flush()
    else:
        con.print(status_line(turn), style="dim", soft_wrap=True, markup=False)


def _show_conversation(con: Console, session: ChatSession, width: int = 100) -> None:
    """A short recap after /load: one line per message."""
    if session.system:
        con.print(f"  system: {_one_line(session.system, width)}", style="dim", markup=False, soft_wrap=True)
    for m in session.messages:
        content = m.get("content")
        text = content if isinstance(content, str) else json.dumps(content, ensure_ascii=False)
        con.print(f"  {m['role']}: {_one_line(text, width)}", style="dim", markup=False, soft_wrap=True)


def _one_line(text: str, width: int) -> str:
    flat = _CONTROL.sub(" ", " ".join(text.split()))
    return flat if len(flat) <= width else flat[: width - 1] + "…"
