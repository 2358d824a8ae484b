"""What a run records about how it was made: the provenance in ``metrics_*.json``, and in a saved model its
``pruning_config.json`` (the flags, which ``--config`` replays) and a model card ``README.md``.

The card is written with the model (results pending) and rewritten once perplexity and zero-shot results exist;
a failure there is a warning: it never costs the saved model.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shlex
import sys
from pathlib import Path

from pruning.checksums import tensor_sha256

log = logging.getLogger(__name__)

PRUNING_CONFIG = "pruning_config.json"
CARD = "README.md"


def file_sha256(path: str | None, limit: int = 4 << 30) -> str | None:
    """SHA-256 of a local data file (None for a hub name, a directory, or a file over ``limit`` bytes)."""
    if not path:
        return None
    file = Path(path).expanduser()
    if not file.is_file() or file.stat().st_size > limit:
        return None
    digest = hashlib.sha256()
    with file.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def provenance(argv: list[str] | None, calibration_ids, eval_ids, args: argparse.Namespace) -> dict:
    """This tool's version and commit, the exact command, and hashes of the data it read."""
    from pruning.cli.parser import package_version

    version, sha = package_version()
    command = None if argv is None else "wanda-prune " + shlex.join(argv)
    return {
        "tool": "wanda-prune", "version": version, "git_sha": sha or None, "argv": argv, "command": command,
        "python_executable": sys.executable, "config_file": getattr(args, "config", None),
        "calibration_ids_sha256": tensor_sha256(calibration_ids),
        "calibration_shape": None if calibration_ids is None else list(calibration_ids.shape),
        "calibration_file_sha256": file_sha256(args.calib_dataset),
        "eval_ids_sha256": tensor_sha256(eval_ids), "eval_file_sha256": file_sha256(args.eval_dataset),
    }  # fmt: skip


def pruning_config(metrics: dict) -> dict:
    """The saved model's ``pruning_config.json``: every flag (``--config`` replays them, less where a run writes),
    the library config as used, and the provenance."""
    return {
        "format": "wanda-prune pruning_config", "version": 1,
        "flags": metrics.get("config", {}), "prune_config": metrics.get("prune_config", {}),
        "provenance": metrics.get("provenance", {}), "versions": metrics.get("versions", {}),
    }  # fmt: skip


def provenance_files(metrics: dict) -> dict[str, str]:
    """The files a saved model gets beside its weights: ``pruning_config.json`` and the card."""
    return {
        PRUNING_CONFIG: json.dumps(pruning_config(metrics), indent=2, sort_keys=True, default=str) + "\n",
        CARD: model_card(metrics),
    }


def update_model_card(target: Path, metrics: dict) -> None:
    """Rewrite the card of a saved model with the run's results; a warning, never an error, if that fails."""
    from pruning.cli.outputs import write_text_atomically

    try:
        write_text_atomically(target / CARD, model_card(metrics))
    except OSError as err:
        log.warning("could not update the model card in %s (%s); the model itself is saved", target, err)


def model_card(metrics: dict) -> str:
    """A Hugging Face model card (huggingface_hub's ``ModelCard``): base model, method, pattern, measured
    sparsity, results, the command, the calibration data and its hash, library versions, tags."""
    from huggingface_hub import ModelCard, ModelCardData

    from pruning.cli.summary import method_line, zero_shot_line

    flags, config = metrics.get("config", {}), metrics.get("prune_config", {})
    prov, versions = metrics.get("provenance", {}), metrics.get("versions", {})
    base = str(flags.get("model", "?"))
    kind = config.get("sparsity_type", "?")
    tags = ["pruned", "sparse", f"pruning-{config.get('method', '?')}", kind.replace(":", "-"), "wanda-prune"]
    data = ModelCardData(
        base_model=base if not Path(base).expanduser().exists() else None, library_name="transformers", tags=tags
    )
    sparsity = metrics.get("actual_sparsity")
    ppl, dense = metrics.get("ppl_test"), metrics.get("ppl_dense")
    results = [
        f"- measured sparsity of the decoder-layer Linears: {sparsity:.4f}" if sparsity is not None else None,
        f"- perplexity ({flags.get('eval_dataset')}, seqlen {flags.get('seqlen') or 'model default'}): {ppl:.4f}"
        + (f" (dense {dense:.4f})" if dense is not None else "")
        if ppl is not None
        else "- perplexity: not measured (yet)",
        f"- zero-shot: {zero_shot_line(metrics['zero_shot'])}" if "zero_shot" in metrics else None,
    ]
    calibration = (
        f"{flags.get('calib_dataset')}, {flags.get('nsamples')} samples, seed {flags.get('seed')}"
        + (f"; token ids sha256 {prov['calibration_ids_sha256']}" if prov.get("calibration_ids_sha256") else "")
        + (f"; file sha256 {prov['calibration_file_sha256']}" if prov.get("calibration_file_sha256") else "")
    )
    library = ", ".join(f"{name} {value}" for name, value in versions.items() if value)
    body = "\n".join(
        line
        for line in [
            f"# {Path(base).name} pruned: {method_line(config)}",
            "",
            f"Pruned from `{base}` with wanda-prune {prov.get('version', '?')}"
            + (f" (git {prov['git_sha']})" if prov.get("git_sha") else "")
            + f": method `{config.get('method')}`, pattern `{kind}`.",
            "",
            "## Results",
            *[r for r in results if r],
            "",
            "## How it was made",
            f"- command: `{prov.get('command') or '?'}`",
            f"- calibration: {calibration}",
            f"- libraries: {library}",
            f"- every setting: `{PRUNING_CONFIG}` (replay: `wanda-prune --config {PRUNING_CONFIG} --save_model NEW`)",
            "",
        ]
        if line is not None
    )
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}"))
