"""`k2local` command line. Each subcommand lives in its own module (k2local/cli/*.py) and registers here."""
from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

# Torch's OpenMP threads otherwise spin after each op and starve the expert kernels' threads (measured: expert
# time per token 17 ms -> 3 ms on a 16-core Xeon). Must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import click

from k2local.errors import USER_ERRORS

# subcommand name -> "module:function" (imported only when that subcommand runs, so start-up stays fast)
SUBCOMMANDS = {
    "run": "k2local.cli.run:run",
    "serve": "k2local.cli.serve:serve",
    "quantize": "k2local.cli.quantize:quantize",
    "imatrix": "k2local.cli.quantize:imatrix",
    "plan": "k2local.cli.plan:plan",
    "make-tiny": "k2local.cli:make_tiny_cmd",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(SUBCOMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = SUBCOMMANDS.get(name)
        if target is None:
            return None
        mod, fn = target.split(":")
        try:
            return getattr(importlib.import_module(mod), fn)
        except (ImportError, AttributeError):
            return None


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="k2local")
def cli() -> None:
    """Run Kimi K2 (and DeepSeek-V3-architecture models) on one machine."""


_VARIANT_HELP = ("Which layout to copy: kimi_k2 = Kimi K2 (FP8 block weights, tiktoken.model, YaRN); deepseek_v3 = "
                 "DeepSeek-V3 (FP8, grouped routing, Hugging Face tokenizer.json); moonlight = Moonlight (BF16, "
                 "no q LoRA, tiktoken.model); kimi_k2_thinking = Kimi-K2-Thinking (native INT4 routed experts in "
                 "compressed-tensors, BF16 rest, the K2-Thinking chat template); kimi_k25 = the same text model nested "
                 "in Kimi K2.5's multimodal layout (language_model. prefix, text_config).")


@click.command("make-tiny", short_help="Write a tiny random-weights checkpoint (for trying k2local and tests).")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--variant", type=click.Choice(["kimi_k2", "deepseek_v3", "moonlight", "kimi_k2_thinking", "kimi_k25"]),
              default="kimi_k2",
              show_default=True, help=_VARIANT_HELP)
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the random weights (the same seed writes the same files).")
@click.option("--force", is_flag=True, help="Replace OUT if it already holds a checkpoint.")
def make_tiny_cmd(out: Path, variant: str, seed: int, force: bool) -> None:
    """Write a tiny checkpoint with RANDOM weights to the new directory OUT, in the file layout of the chosen
    --variant (config.json, sharded safetensors with an index, and that model's tokenizer files).

    Its answers are gibberish: it is for trying k2local and for tests. OUT appears only once complete.
    """
    import shutil  # noqa: PLC0415
    import tempfile  # noqa: PLC0415

    from k2local.errors import K2Error  # noqa: PLC0415

    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise K2Error(f"{out}: exists and is not a directory")
        entries = list(out.iterdir())
        is_ckpt = (out / "config.json").exists()
        if entries and not is_ckpt:
            raise K2Error(f"{out}: directory is not empty and holds no checkpoint; choose a new directory")
        if entries and not force:
            raise K2Error(f"{out}: already holds a checkpoint; pass --force to replace it")
    parent = out.absolute().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=parent))
    except OSError as e:
        raise K2Error(f"{out}: cannot create the directory ({e.strerror or e})") from None
    try:
        from k2local.tiny import make_tiny  # noqa: PLC0415 (deferred: k2local.tiny imports torch, slow at start-up)

        try:
            make_tiny(tmp, variant, seed)
        except Exception as e:  # noqa: BLE001 (safetensors reports a full disk as its own error type)
            if not isinstance(e, OSError) and "I/O error" not in str(e) and "IoError" not in str(e):
                raise
            why = getattr(e, "strerror", None) or ("No space left on device" if "os error 28" in str(e) else
                                                  str(e).split("I/O error: ")[-1])
            raise K2Error(f"{out}: cannot write the checkpoint ({why}); nothing was left behind") from None
        if out.exists():  # an empty directory, or (with --force) an old checkpoint: replaced as a whole
            old = parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    click.echo(f"wrote tiny {variant} checkpoint (random weights) to {out}")


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors print one clear line and exit 2, never a traceback."""
    try:
        cli.main(args=argv, prog_name="k2local", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.BadParameter as e:
        if isinstance(e, click.MissingParameter):
            e.show()
            sys.exit(e.exit_code)
        click.echo(f"k2local: error: {e.format_message()}", err=True)  # one line naming the flag, no usage block
        sys.exit(2)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except USER_ERRORS as e:
        click.echo(f"k2local: error: {e}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
