"""llama.cpp's own HF -> GGUF converter (``convert_hf_to_gguf.py`` from the llama-cpp-python 0.3.36 sdist) as a peer.

The sdist is not vendored here: ``tests/peers/fetch_llama_sdist.sh`` downloads it with pip and unpacks it into
``$K2LOCAL_LLAMA_SDIST`` (default ``~/.cache/k2local/llama-cpp-python-0.3.36``); :func:`sdist_dir` finds it or
returns None (the tests skip).

What the converter needs for a tiny Kimi checkpoint, and what :func:`convert` does about it:

- Kimi K2's vocabulary goes through ``DeepseekV2Model.set_vocab``: the ``gpt2`` path first (``AutoTokenizer``
  without remote code, which fails for a Kimi checkpoint and is skipped), then ``AutoTokenizer.from_pretrained(dir,
  trust_remote_code=True)``, whose ``.model._mergeable_ranks`` (a tiktoken Encoding) and ``.special_tokens`` it
  reads. A real Kimi checkpoint ships that tokenizer as remote code (``tokenization_kimi.py``); the tiny checkpoint
  does not, so :func:`prepare_checkpoint` makes a copy of the checkpoint directory (safetensors linked, not copied)
  with a small remote-code tokenizer of our own (:data:`TOKENIZER_MODULE`: tiktoken over the tiny
  ``tiktoken.model`` with Kimi's split pattern, i.e. k2local's tokenizer) and an ``auto_map`` pointing at it.
- ``AutoTokenizer`` first loads the model config with the same ``trust_remote_code``; the checkpoint's config.json
  maps ``AutoConfig`` to ``configuration_deepseek.DeepseekV3Config`` (shipped by Kimi as remote code, absent from
  the tiny checkpoint), so the copy also gets :data:`CONFIG_MODULE`: transformers' own ``DeepseekV3Config`` under
  ``model_type`` "kimi_k2".
- The converter names the pre-tokenizer by hashing the token ids of a fixed text; the hash of Kimi K2's real
  vocabulary is known to it ("kimi-k2"), a tiny vocabulary's is not, and it raises. :data:`WRAPPER` runs the
  converter unmodified (runpy) after wrapping ``TextModel.get_vocab_base_pre`` so that an *unrecognised* hash
  answers "kimi-k2" (the tiny tokenizer uses Kimi's pattern; any recognised hash is returned unchanged).

Nothing else is changed: the weights (compressed-tensors pack-quantized INT4 dequantized by the converter's own
``dequant_packed``), the hyper-parameters and the tensor layout are the converter's.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

VERSION = "0.3.36"
_ENV = "K2LOCAL_LLAMA_SDIST"


def cache_dir() -> Path:
    env = os.environ.get(_ENV)
    if env:
        return Path(env)
    return Path.home() / ".cache" / "k2local" / f"llama-cpp-python-{VERSION}"


def sdist_dir() -> Path | None:
    """The unpacked sdist's vendor/llama.cpp directory (with convert_hf_to_gguf.py and gguf-py), or None."""
    base = cache_dir()
    for cand in (base / "vendor" / "llama.cpp", base / f"llama_cpp_python-{VERSION}" / "vendor" / "llama.cpp"):
        if (cand / "convert_hf_to_gguf.py").is_file() and (cand / "gguf-py" / "gguf").is_dir():
            return cand
    return None


TOKENIZER_MODULE = '''\
"""Remote-code tokenizer for a k2local tiny Kimi checkpoint (written by k2local's tests for llama.cpp's converter):
the interface Kimi K2's tokenization_kimi.py gives it (.model, a tiktoken Encoding; .special_tokens)."""
from pathlib import Path

import tiktoken
from transformers import PreTrainedTokenizer

from k2local.tokenizer.tiktoken_bpe import KIMI_PAT_STR, Tokenizer


class TinyKimiTokenizer(PreTrainedTokenizer):
    vocab_files_names = {"vocab_file": "tiktoken.model"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file, **kwargs):
        tok = Tokenizer.from_dir(Path(vocab_file).parent)
        self.special_tokens = dict(tok.special_tokens)
        self.model = tiktoken.Encoding("tiny_kimi", pat_str=KIMI_PAT_STR, mergeable_ranks=dict(tok.ranks),
                                       special_tokens=self.special_tokens)
        self._n_vocab = tok.vocab_size
        self._decoder = {i: t for t, i in tok.ranks.items()}
        self._decoder.update({i: t.encode() for t, i in self.special_tokens.items()})
        super().__init__(**kwargs)

    @property
    def vocab_size(self):
        return self._n_vocab

    def get_vocab(self):
        return {self._decoder[i].decode("latin-1"): i for i in self._decoder}

    def encode(self, text, add_special_tokens=True, **kwargs):
        return self.model.encode(text, allowed_special="all")

    def _tokenize(self, text, **kwargs):
        return [self._decoder[i].decode("latin-1") for i in self.model.encode(text, allowed_special="all")]

    def _convert_token_to_id(self, token):
        return self.get_vocab().get(token, 0)

    def _convert_id_to_token(self, index):
        return self._decoder.get(index, b"").decode("latin-1")

    def convert_tokens_to_string(self, tokens):
        return b"".join(t.encode("latin-1") for t in tokens).decode("utf-8", "replace")

    def save_vocabulary(self, save_directory, filename_prefix=None):
        return ()
'''

CONFIG_MODULE = '''\
"""Remote-code config for a k2local tiny Kimi checkpoint: transformers' DeepseekV3Config as model_type kimi_k2."""
from transformers import DeepseekV3Config as _Base


class DeepseekV3Config(_Base):
    model_type = "kimi_k2"
'''

WRAPPER = '''\
import runpy, sys
sys.path.insert(0, sys.argv[1])
from conversion import base
_orig = base.TextModel.get_vocab_base_pre
def get_vocab_base_pre(self, tokenizer):
    try:
        return _orig(self, tokenizer)
    except NotImplementedError:
        print("k2local: unrecognised pre-tokenizer hash (tiny vocabulary) -> kimi-k2", file=sys.stderr)
        return "kimi-k2"
base.TextModel.get_vocab_base_pre = get_vocab_base_pre
script = sys.argv[1] + "/convert_hf_to_gguf.py"
sys.argv = [script] + sys.argv[2:]
runpy.run_path(script, run_name="__main__")
'''


def prepare_checkpoint(src: Path, dst: Path) -> Path:
    """A copy of checkpoint ``src`` at ``dst`` (weights symlinked) with the remote-code tokenizer added."""
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.suffix == ".safetensors":
            (dst / f.name).symlink_to(f.resolve())
        elif f.is_file():
            (dst / f.name).write_bytes(f.read_bytes())
    (dst / "tokenization_tiny_kimi.py").write_text(TOKENIZER_MODULE)
    if not (dst / "configuration_deepseek.py").exists():
        (dst / "configuration_deepseek.py").write_text(CONFIG_MODULE)
    tc = json.loads((dst / "tokenizer_config.json").read_text())
    tc["tokenizer_class"] = "TinyKimiTokenizer"
    tc["auto_map"] = {"AutoTokenizer": ["tokenization_tiny_kimi.TinyKimiTokenizer", None]}
    (dst / "tokenizer_config.json").write_text(json.dumps(tc, indent=2))
    return dst


def convert(checkpoint: Path, out: Path, outtype: str = "f32", timeout: float = 600,
            work: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run llama.cpp's converter on ``checkpoint`` (a tiny Kimi directory) writing ``out``; raises on failure."""
    llama = sdist_dir()
    if llama is None:
        raise FileNotFoundError(f"llama-cpp-python {VERSION} sdist not found under {cache_dir()}")
    ck = prepare_checkpoint(checkpoint, (work or out.parent) / (checkpoint.name + "-llconv"))
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(llama / "gguf-py"), str(root), env.get("PYTHONPATH", "")])
    env.pop("NO_LOCAL_GGUF", None)
    env["HF_HUB_OFFLINE"] = "1"
    cmd = [sys.executable, "-c", WRAPPER, str(llama), str(ck), "--outfile", str(out), "--outtype", outtype]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0 or not out.is_file():
        raise RuntimeError(f"convert_hf_to_gguf.py exited {r.returncode}:\n{r.stderr[-4000:]}")
    return r
