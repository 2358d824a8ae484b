"""``--push_to_hub REPO``: upload the saved model directory to the Hugging Face Hub, last, after every result is
written; a failure is one line that says where the model is, never a loss of it."""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


def check_push_target(repo_id: str | None, save_model: str | None) -> None:
    """Before any work: a repo id the Hub accepts, a model to push, and a Hub this process may reach."""
    if repo_id is None:
        return
    if not save_model:
        raise ValueError("--push_to_hub uploads the saved model: add --save_model DIR")
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(f"--push_to_hub {repo_id!r} is not a Hub repo id (user/name): {err}") from None
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise ValueError(
            "--push_to_hub needs the Hugging Face Hub, but HF_HUB_OFFLINE is set: unset it, or drop the flag and "
            "upload the --save_model directory later (huggingface-cli upload)"
        )


def push_model(repo_id: str, folder: Path) -> str:
    """Create (if needed) and upload; returns the repo's URL. Any failure: a ValueError naming the saved folder."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        url = api.create_repo(repo_id, exist_ok=True, repo_type="model")
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                          commit_message="wanda-prune: pruned model")  # fmt: skip
    except Exception as err:  # network, auth, quota: the hub's own message, in one line
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(
            f"--push_to_hub {repo_id!r} failed ({type(err).__name__}: {first}); the model is saved in {str(folder)!r}: "
            "upload it later with huggingface-cli upload"
        ) from err
    log.info("pushed %s to %s", folder, url)
    return str(url)
