"""Bad input to every command, as a new user would type it: the real CLI in a subprocess must answer with exit
status 2 and one line naming the flag or file, never a traceback, and leave no half-written files behind."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def env(_k2local_cache: Path) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, K2LOCAL_CACHE=str(_k2local_cache), PYTHONPATH=path, COLUMNS="200",
                OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES=os.environ.get("CUDA_VISIBLE_DEVICES", ""))


def k2(env: dict[str, str], *args: str, cwd: Path | None = None, stdin: str | None = "",
       timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "k2local.cli", *args], capture_output=True, text=True, env=env,
                          cwd=str(cwd) if cwd else None, input=stdin, timeout=timeout)


def one_line_error(p: subprocess.CompletedProcess, *names: str) -> str:
    """The run failed with exit 2 and a single error line that names each of `names`; that line."""
    assert "Traceback" not in p.stderr + p.stdout, p.stderr
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    errs = [ln for ln in p.stderr.splitlines() if "error" in ln.lower()]
    assert len(errs) == 1, p.stderr
    for n in names:
        assert n in errs[0], (n, errs[0])
    return errs[0]


# ---------------------------------------------------------------------------------------------- flag values
BAD_FLAGS = [
    ("--ram", "nan"), ("--ram", "inf"), ("--ram", "-1"), ("--ram", "abc"),
    ("--gpu-mem", "-1"), ("--gpu-mem", "0"), ("--gpu-mem", "nan"),
    ("--max-context", "0"), ("--max-context", "-5"), ("--max-context", "15"), ("--max-context", "1e8"),
]


def main_in_process(capsys, *args: str) -> subprocess.CompletedProcess:
    """k2local.cli.main in this process (the CLI's real entry point, minus the interpreter start-up), as a
    CompletedProcess; an exception that escapes main (what would be a traceback) fails the test."""
    from k2local.cli import main

    code: object = 0
    try:
        main(list(args))
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)


@pytest.mark.parametrize("command", ["run", "serve", "plan"])
@pytest.mark.parametrize(("flag", "value"), BAD_FLAGS)
def test_bad_flag_values_are_one_line(capsys, tiny_k2, command: str, flag: str, value: str) -> None:
    p = main_in_process(capsys, command, str(tiny_k2), f"{flag}={value}")
    line = one_line_error(p, flag)
    assert "cannot load" not in line  # the flag is blamed, not the model
    assert p.stderr.strip() == line.strip() and not p.stdout


@pytest.mark.parametrize(("flag", "value"), [("--temperature", "-1"), ("--top-p", "2"), ("--top-k", "-1"),
                                           ("--max-tokens", "0")])
def test_bad_sampling_flags_name_the_flag(capsys, tiny_k2, flag: str, value: str) -> None:
    p = main_in_process(capsys, "run", str(tiny_k2), flag, value)
    assert p.stderr.strip() == one_line_error(p, f"'{flag}'").strip()


@pytest.mark.parametrize("value", ["abc", "inf", "-3G"])
def test_bad_split_max_size_names_the_flag(capsys, tiny_k2, tmp_path, value: str) -> None:
    p = main_in_process(capsys, "quantize", str(tiny_k2), str(tmp_path / "o.gguf"), "--split-max-size", value)
    one_line_error(p, "--split-max-size", repr(value))
    assert list(tmp_path.iterdir()) == []


def test_missing_or_directory_input_files_name_the_flag(env, tiny_k2, tmp_path) -> None:
    """--imatrix and --routing-stats name a file that must exist (a typo was silently ignored by plan); imatrix's
    -o is checked before the (long) collection, and nothing is left behind."""
    (tmp_path / "adir").mkdir()
    text = tmp_path / "calib.txt"
    text.write_text("hello world\n")
    for args, flag, why in [
            (["quantize", str(tiny_k2), str(tmp_path / "o.gguf"), "--imatrix", str(tmp_path / "adir")], "--imatrix",
             "is a directory"),
            (["plan", str(tiny_k2), "--no-measure", "--routing-stats", str(tmp_path / "nope.json")],
             "--routing-stats", "does not exist"),
            (["imatrix", str(tiny_k2), str(text), "-o", str(tmp_path / "adir")], "--out", "is a directory"),
            (["imatrix", str(tiny_k2), str(text), "-o", str(tmp_path / "no" / "im.gguf")], "-o", "does not exist")]:
        p = k2(env, *args, cwd=tmp_path)
        assert p.stderr.strip() == one_line_error(p, flag, why).strip() and not p.stdout
    assert sorted(f.name for f in tmp_path.iterdir()) == ["adir", "calib.txt"]


def test_python_dash_m_k2local(env, tmp_path) -> None:
    p = subprocess.run([sys.executable, "-m", "k2local", "--help"], capture_output=True, text=True, env=env,
                       cwd=tmp_path, timeout=60)
    assert p.returncode == 0 and "Usage: k2local" in p.stdout and "make-tiny" in p.stdout


@pytest.mark.parametrize("command", ["run", "serve", "plan"])
def test_bad_flag_value_subprocess(env, tiny_k2, tmp_path, command: str) -> None:
    p = k2(env, command, str(tiny_k2), "--ram", "nan", cwd=tmp_path)
    assert p.stderr.strip() == one_line_error(p, "--ram", "nan").strip()


@pytest.mark.parametrize("command", ["run", "serve", "plan"])
def test_shared_flags_have_one_help(capsys, command: str) -> None:
    """run, serve and plan describe --max-context, --gpu-mem and --ram identically, defaults included."""
    p = main_in_process(capsys, command, "--help")
    assert p.returncode == 0
    out = " ".join(p.stdout.split())
    assert "--max-context INTEGER Context window in tokens, at least 16 [default: 8192" in out
    assert "--gpu-mem GIB GiB of GPU memory to use [default: what is free" in out
    assert "--ram GIB GiB of RAM for routed experts [default:" in out


@pytest.mark.parametrize(("flag", "value"), [("--chunks", "0"), ("--chunks", "-3"), ("--ctx", "0")])
def test_imatrix_counts_rejected(capsys, tiny_k2, tmp_path, flag: str, value: str) -> None:
    text = tmp_path / "calib.txt"
    text.write_text("hello world\n")
    p = main_in_process(capsys, "imatrix", str(tiny_k2), str(text), "-o", str(tmp_path / "im.gguf"), flag, value)
    one_line_error(p, flag)
    assert not (tmp_path / "im.gguf").exists()


def _no_cuda() -> bool:
    import torch

    return not torch.cuda.is_available()


@pytest.mark.skipif(not _no_cuda(), reason="checks a machine without a GPU")
def test_plan_without_gpu_shows_no_gpu_rows_and_ignores_gpu_mem(env, tiny_k2) -> None:
    import json

    p = k2(env, "plan", str(tiny_k2), "--no-measure", "--gpu-mem", "8")
    assert p.returncode == 0, p.stderr
    out = " ".join(p.stdout.split())
    assert "GPU memory" not in out and "host to GPU" not in out
    assert "--gpu-mem 8 is ignored" in out
    p = k2(env, "plan", str(tiny_k2), "--no-measure", "--gpu-mem", "8", "--json")
    d = json.loads(p.stdout)
    assert d["bandwidths"]["gpu"] is None and d["bandwidths"]["h2d"] is None
    assert any("--gpu-mem 8 is ignored" in n for n in d["plan"]["notes"])


def test_max_context_beyond_the_model_is_said(env, tiny_k2) -> None:
    p = k2(env, "plan", str(tiny_k2), "--no-measure", "--cpu-only", "--max-context", "100000000")
    assert p.returncode == 0, p.stderr
    out = " ".join(p.stdout.split())
    assert "--max-context 100000000 is more than this model supports" in out and "using 131072 tokens" in out


# ---------------------------------------------------------------------------------------------- bad checkpoints
@pytest.fixture
def bad_config(tiny_k2, tmp_path):
    """bad_config({"field": value}) -> a copy of the tiny checkpoint (linked shards) with config.json changed."""
    import json

    def make(change: dict) -> Path:
        d = tmp_path / "bad"
        d.mkdir()
        for f in tiny_k2.iterdir():
            (d / f.name).symlink_to(f)
        (d / "config.json").unlink()
        cfg = json.loads((tiny_k2 / "config.json").read_text())
        cfg.update(change)
        (d / "config.json").write_text(json.dumps(cfg))
        return d

    return make


@pytest.mark.parametrize("change", [{"hidden_size": "big"}, {"num_hidden_layers": -1}, {"rope_theta": "x"},
                                    {"num_experts_per_tok": 99}])
def test_bad_config_field_names_file_and_field(capsys, bad_config, tmp_path, change: dict) -> None:
    src = bad_config(change)
    field = next(iter(change))
    for args in (["plan", str(src), "--no-measure"], ["quantize", str(src), str(tmp_path / "o.gguf")]):
        p = main_in_process(capsys, *args)
        one_line_error(p, str(src / "config.json"), repr(field))
    assert not list(tmp_path.glob("o.gguf*"))  # no output, no resume state


def test_bad_config_run_subprocess(env, bad_config, tmp_path) -> None:
    src = bad_config({"hidden_size": "big"})
    p = k2(env, "run", str(src), stdin="hi\n", cwd=tmp_path)
    one_line_error(p, "config.json", "'hidden_size'")


@pytest.mark.skipif(not _no_cuda(), reason="checks a machine without CUDA")
def test_quantize_device_cuda_without_cuda(capsys, tiny_k2, tmp_path) -> None:
    p = main_in_process(capsys, "quantize", str(tiny_k2), str(tmp_path / "o.gguf"), "--device", "cuda")
    one_line_error(p, "--device", "CUDA")
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def truncated_gguf(tiny_k2, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("gguf")
    from k2local.convert.to_gguf import convert

    full = convert(tiny_k2, d / "full.gguf", "q8").paths[0]
    return full


@pytest.mark.parametrize("keep", [100, 5000, 1_000_000, 3_000_000])
def test_truncated_gguf_says_truncated(capsys, truncated_gguf, tmp_path, keep: int) -> None:
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(truncated_gguf.read_bytes()[:keep])
    p = main_in_process(capsys, "plan", str(cut), "--no-measure")
    line = one_line_error(p, str(cut), "truncated")
    assert "reshape" not in line and "out of bounds" not in line


def test_missing_tokenizer_said_once(capsys, tiny_k2, tmp_path) -> None:
    d = tmp_path / "notok"
    d.mkdir()
    for f in tiny_k2.iterdir():
        if f.name != "tiktoken.model":
            (d / f.name).symlink_to(f)
    p = main_in_process(capsys, "quantize", str(d), str(tmp_path / "o.gguf"))
    line = one_line_error(p, str(d), "no tokenizer found")
    assert "tokenizer: " not in line and line.count(str(d)) == 1


# ---------------------------------------------------------------------------------------------- make-tiny
def test_make_tiny_unwritable_place(capsys) -> None:
    one_line_error(main_in_process(capsys, "make-tiny", "/proc/x"), "/proc/x")


def test_make_tiny_refuses_existing_checkpoint_unless_force(env, tmp_path) -> None:
    out = tmp_path / "t"
    assert k2(env, "make-tiny", str(out)).returncode == 0
    before = sorted(f.name for f in out.iterdir())
    one_line_error(k2(env, "make-tiny", str(out), "--variant", "deepseek_v3"), str(out), "--force")
    assert sorted(f.name for f in out.iterdir()) == before and (out / "tiktoken.model").exists()
    p = k2(env, "make-tiny", str(out), "--variant", "deepseek_v3", "--force")
    assert p.returncode == 0, p.stderr
    names = {f.name for f in out.iterdir()}
    assert "tokenizer.json" in names and "tiktoken.model" not in names  # replaced whole, never mixed
    assert sorted(f.name for f in tmp_path.iterdir()) == ["t"]  # no temp or old directory left


@pytest.fixture
def small_fs(tmp_path):
    """A tiny tmpfs (needs root); skipped where it cannot be mounted."""
    d = tmp_path / "fs"
    d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(d)], capture_output=True)
    if r.returncode:
        pytest.skip("cannot mount a small tmpfs here")
    yield d
    subprocess.run(["umount", str(d)], capture_output=True)


def test_make_tiny_full_disk_leaves_nothing(env, small_fs) -> None:
    p = k2(env, "make-tiny", str(small_fs / "t"))
    one_line_error(p, str(small_fs / "t"), "No space left")
    assert list(small_fs.iterdir()) == []


# ---------------------------------------------------------------------------------------------- random weights
def test_make_tiny_checkpoints_and_their_ggufs_say_random_weights(env, tiny_k2, truncated_gguf, tmp_path) -> None:
    import json

    for model in (tiny_k2, truncated_gguf):  # the fixture's full GGUF, converted from the tiny checkpoint
        p = k2(env, "run", str(model), "--json", "--max-tokens", "2", stdin="hi\n", cwd=tmp_path)
        assert p.returncode == 0, p.stderr
        assert json.loads(p.stdout)["random_weights"] is True
        assert "RANDOM WEIGHTS" in p.stderr
        p = k2(env, "plan", str(model), "--no-measure", "--json", cwd=tmp_path)
        assert json.loads(p.stdout)["random_weights"] is True


# ---------------------------------------------------------------------------------------------- quantize
def test_split_max_size_below_largest_tensor(capsys, tiny_k2, tmp_path) -> None:
    p = main_in_process(capsys, "quantize", str(tiny_k2), str(tmp_path / "o.gguf"), "--split-max-size", "1K")
    one_line_error(p, "--split-max-size", "largest tensor")
    assert list(tmp_path.iterdir()) == []


def test_quantize_up_front_space_check_in_mb(env, tiny_k2, small_fs) -> None:
    p = k2(env, "quantize", str(tiny_k2), str(small_fs / "o.gguf"), "-r", "q8")
    line = one_line_error(p, str(small_fs), "MB", "free some space and rerun")
    assert "0.0 GiB" not in line and "0.1 GiB" not in line
    assert list(small_fs.iterdir()) == []


def test_quantize_disk_full_midway_leaves_nothing(capsys, monkeypatch, tiny_k2, tmp_path) -> None:
    import errno

    from quant import gguf_file

    real = gguf_file.GGUFStreamWriter.write
    calls = [0]

    def write(self, data):  # the disk fills up partway through (the up-front check passed)
        calls[0] += 1
        if calls[0] == 10:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data)

    monkeypatch.setattr(gguf_file.GGUFStreamWriter, "write", write)
    p = main_in_process(capsys, "quantize", str(tiny_k2), str(tmp_path / "o.gguf"), "-r", "q8")
    one_line_error(p, "no space left", "rerun")
    assert list(tmp_path.iterdir()) == []  # no .partial, no .resume.json, no .resume.json.tmp


def test_quantize_sigterm_saves_a_resume_point(capsys, monkeypatch, tiny_k2, tmp_path) -> None:
    import signal

    from k2local.convert import to_gguf

    real = to_gguf._write_rows
    calls = [0]

    def write_rows(*a, **k):
        calls[0] += 1
        if calls[0] == 15:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **k)

    monkeypatch.setattr(to_gguf, "_write_rows", write_rows)
    out = tmp_path / "o.gguf"
    p = main_in_process(capsys, "quantize", str(tiny_k2), str(out), "-r", "q8")
    assert p.returncode == 128 + signal.SIGTERM and "rerun the same command to resume" in p.stderr
    assert "Traceback" not in p.stderr
    assert (tmp_path / "o.gguf.resume.json").exists() and not out.exists()
    monkeypatch.setattr(to_gguf, "_write_rows", real)
    p = main_in_process(capsys, "quantize", str(tiny_k2), str(out), "-r", "q8")
    assert p.returncode == 0 and "resuming" in p.stdout + p.stderr
    assert sorted(f.name for f in tmp_path.iterdir()) == ["o.gguf"]
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handler is removed again


# ---------------------------------------------------------------------------------------------- help
def test_help_texts(capsys) -> None:
    top = main_in_process(capsys, "--help").stdout
    assert "..." not in top.split("Commands:")[1] and "make-tiny" in top
    q = main_in_process(capsys, "quantize", "--help").stdout
    assert "Usage: k2local quantize [OPTIONS] SRC OUT" in q
    mt = " ".join(main_in_process(capsys, "make-tiny", "--help").stdout.split())
    assert "exact file layout" not in mt
    assert "deepseek_v3 = DeepSeek-V3" in mt and "moonlight = Moonlight" in mt and "--seed INTEGER Seed" in mt
    serve = " ".join(main_in_process(capsys, "serve", "--help").stdout.split())
    assert "--max-context INTEGER Context window in tokens, at least 16 [default: 8192" in serve


# ---------------------------------------------------------------------------------------------- chat /save
def test_save_missing_directory_and_full_disk(env, small_fs, tmp_path) -> None:
    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(sys.executable, ["-m", "k2local.cli", "run", "--max-tokens", "2", "--temperature", "0"],
                          env={**env, "TERM": "xterm"}, cwd=str(tmp_path), encoding="utf-8", timeout=120,
                          dimensions=(50, 200))
    child.expect_exact(">>> ")
    for target, missing in (("no/such/dir/c.json", "no/such/dir"), ("chats/c.json", "chats")):
        child.sendline(f"/save {target}")  # one missing level or several: refused, never created
        child.expect(f"{target}: cannot write: directory {missing} does not exist \\(nothing written\\)")
        child.expect_exact(">>> ")
        assert "Traceback" not in child.before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fs"]  # nothing written, no directory made
    filler = small_fs / "filler"
    with open(filler, "wb", buffering=0) as f:  # fill the small filesystem to the last byte
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
    child.sendline(f"/save {small_fs}/c.json")
    child.expect(f"{small_fs}/c.json: cannot write: No space left on device; free some space and /save again "
                 r"\(nothing written\)")
    child.expect_exact(">>> ")
    assert sorted(p.name for p in small_fs.iterdir()) == ["filler"]  # no hidden temp file
    child.sendline("/exit")
    child.expect(pexpect.EOF)
