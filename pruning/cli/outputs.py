"""Writing results: Wanda's log file, one metrics file per run, and a saved model, without losing what exists."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

from pruning import checksums
from pruning.cli import durable


def _prove_writable(directory: Path, what: str) -> None:
    """Create ``directory`` and write a probe file in it, or raise a one-line ValueError about ``what``."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-test-"):
            pass
    except OSError as err:
        raise ValueError(
            f"cannot write {what} {str(directory)!r}: {err.strerror or err}; choose a writable directory"
        ) from None


def check_save_dir(path: str) -> Path:
    """Create ``--save`` now and prove it is writable, so a long run cannot fail at its very end."""
    directory = Path(path).expanduser()
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"--save {str(directory)!r} is a file, not a directory; choose a directory for the results")
    _prove_writable(directory, "to --save directory")
    return directory


def check_save_model_dir(path: str, overwrite: bool) -> Path:
    """Refuse an existing ``--save_model`` without ``overwrite``, or one ``overwrite`` must not replace (the current
    directory, a directory that holds no saved model), and prove its parent is writable (creating it)."""
    target = Path(path).expanduser()
    if target.is_symlink():
        raise ValueError(
            f"--save_model {str(target)!r} is a symbolic link; a save replaces the directory it names, not the "
            f"link: pass the directory itself ({str(target.resolve())!r})"
        )
    if target.exists() and not target.is_dir():
        raise ValueError(f"--save_model {str(target)!r} is a file, not a directory; choose another path")
    if target.exists() and not overwrite:
        raise ValueError(f"--save_model directory {str(target)!r} already exists; pass --overwrite to replace it")
    cwd = Path.cwd().resolve()
    if target.exists() and (target.resolve() == cwd or target.resolve() in cwd.parents):
        raise ValueError(
            f"--save_model {str(target)!r} is the current directory or contains it, which a saved model cannot "
            "replace; name a directory of its own"
        )
    if target.exists() and not (target / "config.json").is_file() and any(target.iterdir()):
        raise ValueError(
            f"--save_model {str(target)!r} is not empty and holds no saved model (no config.json); --overwrite "
            "replaces only a model directory: choose a new directory"
        )
    _prove_writable(target.parent, "--save_model into")
    return target


WANDA_COLUMNS = ("method", "actual_sparsity", "ppl_test")  # locuslab/wanda's, first and unchanged
LOG_COLUMNS = (*WANDA_COLUMNS, "sparsity_type", "model", "utc_time", "metrics_file")
WANDA_LOG_HEADER = "\t".join(LOG_COLUMNS) + "\n"


def write_wanda_log(
    directory: Path, method: str, actual_sparsity: float, ppl_test: float | None, sparsity_type: str = "",
    model: str = "", metrics_file: str = "",
) -> Path:  # fmt: skip
    """``log_{method}.txt``: locuslab/wanda's columns (method, actual_sparsity, ppl_test), then the sparsity type,
    the model, the UTC time and the run's metrics file, so that rows of a sweep into one --save say which run each
    is. The reference rewrites the file on every run; here each run appends its row (under a lock: runs of a job
    array may finish together). A file with the reference's three columns gains the new ones in place (its old
    rows get empty cells)."""
    ppl = "nan" if ppl_test is None else f"{ppl_test:.4f}"
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    row = [method, f"{actual_sparsity:.4f}", ppl, sparsity_type, model.replace("\t", " "), stamp, metrics_file]
    path = directory / f"log_{method}.txt"
    with open(path, "a+", encoding="utf-8") as f, _locked(f):
        f.seek(0)
        lines = f.read().splitlines()
        if lines and lines[0].split("\t") == list(WANDA_COLUMNS):  # the reference's layout: widen it
            pad = "\t" * (len(LOG_COLUMNS) - len(WANDA_COLUMNS))
            f.seek(0)
            f.truncate()
            f.write(WANDA_LOG_HEADER + "".join(f"{line}{pad}\n" for line in lines[1:] if line))
        elif not lines:
            f.write(WANDA_LOG_HEADER)
        f.write("\t".join(row) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return path


@contextlib.contextmanager
def _locked(f):
    """An exclusive advisory lock on an open file (POSIX; elsewhere nothing)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    fcntl.flock(f.fileno(), fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def versions() -> dict[str, str | None]:
    import torch
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    from importlib import metadata

    def installed(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    return {
        "wanda-kernels": installed("wanda-kernels"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "transformers": transformers.__version__,
        **{name: installed(name) for name in ("accelerate", "datasets", "lm_eval", "huggingface_hub", "safetensors")},
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }


def write_text_atomically(path: Path, text: str) -> Path:
    return _write_atomically(path, text)


def _write_atomically(path: Path, text: str) -> Path:
    """Write a sibling temporary file (a name of its own), then rename it over ``path``: readers never see a
    half-written file."""
    descriptor, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~durable.umask())  # mkstemp makes it 0600; results get a plain file's permissions
        os.replace(tmp, path)
        durable.fsync_path(path.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def metrics_path(directory: Path, method: str, sparsity_type: str) -> Path:
    """A new file for this run's metrics: ``metrics_{method}_{type}_{UTC time}.json`` (``2:4`` written ``2-4``),
    with a counter if that name is taken, so no run replaces another's."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    stem = f"metrics_{method}_{sparsity_type.replace(':', '-')}_{stamp}"
    count = 1
    while True:  # claimed by creating it: two runs finishing in one second get two files
        path = directory / (f"{stem}.json" if count == 1 else f"{stem}_{count}.json")
        try:
            path.open("x").close()
            return path
        except FileExistsError:
            count += 1


def write_metrics(path: Path, metrics: dict) -> Path:
    """Write (or update: the zero-shot results come last) one run's metrics file."""
    return _write_atomically(path, json.dumps(metrics, indent=2, sort_keys=True, default=str))


def _step(name: str) -> None:
    """A named moment of a save (``staged``, ``synced``, ``moved_aside``, ``swapped``, ``cleaned``): a no-op the
    fault-injection tests replace, to interrupt a save at each step deterministically."""


def save_model_atomically(
    model, tokenizer, target: Path, overwrite: bool, save_format: str = "dense", on_saved=None,
    extra_files: dict[str, str] | None = None,
) -> Path:  # fmt: skip
    """Write into a hidden sibling directory, flush it to disk, then rename it into place: a crash or a kill never
    leaves a half-written model at ``target``, and an existing one is only replaced (``overwrite``) once the new
    one is complete. SIGINT/SIGTERM are held during the swap. ``save_format="sparse24"``: ``pruning.sparse24``.
    ``extra_files``: name -> text written beside the weights (the run's pruning_config.json and model card).
    Call with the target's lock held (``durable.target_locked``) when other runs may write it. ``on_saved(target)``
    runs once the model is in place, before a held signal is delivered (so a caller can say it was saved)."""
    from pruning.infer.fusion import check_not_fused

    check_not_fused(model)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.partial-"))
    try:
        if save_format == "sparse24":
            from pruning.sparse24 import save_sparse

            save_sparse(model, tokenizer, staging)
        else:
            model.save_pretrained(staging)
            if tokenizer is not None:
                tokenizer.save_pretrained(staging)
            checksums.record(staging)
        for name, text in (extra_files or {}).items():
            (staging / name).write_text(text, encoding="utf-8")
        _step("staged")
        durable.chmod_tree_to_umask(staging)  # weights follow the umask like every other file
        durable.fsync_tree(staging)  # on disk before the rename that publishes it
        _step("synced")
        if target.exists() and (not overwrite or not target.is_dir() or target.is_symlink()):
            # Keep the new model: it may be hours of work. The user moves it where it belongs.
            kept = durable.keep_visible(staging, target)
            raise ValueError(
                f"--save_model {str(target)!r} appeared during the run and is not replaced; the pruned model is in "
                f"{str(kept)!r}"
            )
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # nothing there once it was kept
        raise
    with durable.signals_held():
        if not target.exists():
            staging.rename(target)
            durable.fsync_path(target.parent)
            if on_saved is not None:
                on_saved(target)
            _step("swapped")
            return target
        # A name no one else uses (unique like the staging name), so nothing that was there is deleted by mistake.
        backup = staging.with_name(staging.name.replace(".partial-", ".old-", 1))
        try:
            target.rename(backup)
        except OSError as err:
            kept = durable.keep_visible(staging, target)
            raise ValueError(
                f"--save_model {str(target)!r} could not be replaced ({err.strerror or err}); "
                f"the pruned model is in {str(kept)!r}"
            ) from None
        _step("moved_aside")
        try:
            staging.rename(target)
        except OSError as err:
            backup.rename(target)  # put the previous model back, and keep the new one where it can be found
            kept = durable.keep_visible(staging, target)
            raise ValueError(
                f"--save_model {str(target)!r} could not be replaced ({err.strerror or err}); the previous model is "
                f"back, and the pruned model is in {str(kept)!r}"
            ) from None
        durable.fsync_path(target.parent)
        if on_saved is not None:
            on_saved(target)
        _step("swapped")
        with contextlib.suppress(OSError):  # left over, the next run into the target removes it
            durable.remove(backup)
        _step("cleaned")
    return target
