"""Calibration and evaluation token ids, following Wanda / SparseGPT data loading.

Sources: "c4" and "wikitext2" (Hugging Face Hub datasets, as the papers use them) or a local path: a text file,
a .json/.jsonl file (optionally .gz), or a directory of them. Calibration samples are `nsamples` random windows
of `seqlen` tokens drawn with `random.Random(seed)`, the same draws as Wanda's `random.seed(seed); random.randint`.
Local JSON documents are sampled as Wanda samples C4 (a random document longer than seqlen, a window in it), so
the C4 shard file itself reproduces `--calib_dataset c4` offline; plain text is sampled as WikiText-2 is.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import random
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from pruning import hub
from pruning.errors import OptionError, quote

logger = logging.getLogger(__name__)

HUB_SOURCES = ("c4", "wikitext2")
LOCAL_SUFFIXES = (".txt", ".json", ".jsonl", ".txt.gz", ".json.gz", ".jsonl.gz")

C4_REPO = "allenai/c4"
C4_TRAIN_FILE = "en/c4-train.00000-of-01024.json.gz"
C4_VALIDATION_FILE = "en/c4-validation.00000-of-00008.json.gz"
C4_EVAL_DOCS = 1100  # Wanda: ' '.join(valdata[:1100]['text'])[:256 * seqlen tokens]
C4_EVAL_WINDOWS = 256
WIKITEXT_REPO = "Salesforce/wikitext"  # the hub's canonical home of "wikitext"
WIKITEXT_CONFIG = "wikitext-2-raw-v1"
# Wanda/SparseGPT join the *train* split with " " for calibration and the *test* split with "\n\n" for perplexity.
WIKITEXT_TRAIN_JOIN = " "
WIKITEXT_TEST_JOIN = "\n\n"
LOCAL_DOC_JOIN = "\n\n"


class DataError(ValueError):
    """A data source cannot provide what was asked; the message says what to do instead."""


class DataOptionError(DataError, OptionError):
    """A :class:`DataError` whose fix is another value of an option (``pruning.errors``)."""


# ----------------------------------------------------------------------------------------------------------------------
# tokenization


TOKENIZE_PIECE_CHARS = 8 << 20  # fast tokenizers hold ~100x a text's size in offsets while encoding it


def tokenize(tokenizer: Any, text: str) -> torch.Tensor:
    """Tokenize `text` (with the tokenizer's special tokens, e.g. a leading BOS) into a LongTensor [1, N].

    A text longer than TOKENIZE_PIECE_CHARS goes in pieces cut before a line that starts with a non-space
    character, later pieces without special tokens: byte-level BPE (GPT-2, OPT, LLaMA-3) splits words there
    anyway, so the ids are those of one call; SentencePiece tokenizers may add a word-start marker per piece."""
    if len(text) <= TOKENIZE_PIECE_CHARS:
        return tokenizer(text, return_tensors="pt", verbose=False).input_ids.to(torch.long)
    pieces = []
    start = 0
    while start < len(text):
        end = _piece_end(text, start + TOKENIZE_PIECE_CHARS)
        ids = tokenizer(text[start:end], add_special_tokens=start == 0, verbose=False).input_ids
        pieces.append(torch.tensor(ids, dtype=torch.int32))
        start = end
    return torch.cat(pieces).to(torch.long).unsqueeze(0)


def _piece_end(text: str, at_least: int) -> int:
    """The first index >= at_least just after a newline that is followed by a non-space character, or by one
    space and a non-space (WikiText's lines): GPT-2's pre-tokenizer ends a word there either way, where it
    would keep a run of whitespace together. The end of the text if there is none."""
    position = at_least
    while position < len(text):
        newline = text.find("\n", position - 1)
        if newline < 0:
            return len(text)
        after = text[newline + 1 : newline + 3]
        starts_a_word = after[:1] and not after[0].isspace()
        spaced_word = len(after) == 2 and after[0] == " " and not after[1].isspace()
        if starts_a_word or spaced_word:
            return newline + 1
        position = newline + 2
    return len(text)


def _random_windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int, what: str) -> torch.Tensor:
    """`nsamples` windows of `seqlen` tokens from ids [1, N], starts drawn like Wanda's randint(0, N - seqlen - 1)."""
    n_tokens = ids.shape[1]
    if n_tokens <= seqlen:
        raise DataError(
            f"{what} has only {n_tokens} tokens; calibration needs more than seqlen={seqlen}: "
            "use a longer text or a smaller seqlen"
        )
    rng = random.Random(seed)
    starts = [rng.randint(0, n_tokens - seqlen - 1) for _ in range(nsamples)]
    return torch.stack([ids[0, s : s + seqlen] for s in starts])


# ----------------------------------------------------------------------------------------------------------------------
# local files


def _texts_from_json(path: Path) -> list[str]:
    """Documents from a .json (list of strings / of {"text": ...}, or {"text": [...]}) or .jsonl file."""

    def doc_text(item: Any, where: str) -> str:
        if isinstance(item, str):
            return item
        if isinstance(item, dict) and isinstance(item.get("text"), str):
            return item["text"]
        raise DataError(f'{where}: expected a string or an object with a "text" string field')

    def json_lines(lines: Iterable[str]) -> list[str]:
        return [
            doc_text(json.loads(line), f"{path}:{line_no}") for line_no, line in enumerate(lines, 1) if line.strip()
        ]

    with _open_text(path) as f:
        if _suffix(path) == ".jsonl":
            return json_lines(f)
        text = f.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # JSON Lines under a .json name, as the C4 shards are
            return json_lines(text.splitlines())
        raise
    if isinstance(data, dict) and isinstance(data.get("text"), list):
        data = data["text"]
    if not isinstance(data, list):
        raise DataError(f'{path}: expected a JSON list of documents or {{"text": [...]}}')
    return [doc_text(item, f"{path}[{i}]") for i, item in enumerate(data)]


def _suffix(path: Path) -> str:
    """The data suffix of a file name, without a trailing .gz: '.txt', '.json', '.jsonl' or another."""
    name = path.name[: -len(".gz")] if path.name.endswith(".gz") else path.name
    return Path(name).suffix


def _open_text(path: Path):
    """A text file, gzip-compressed when its name ends in .gz; a UTF-8 byte-order mark is dropped."""
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8-sig", newline=None)
    return open(path, encoding="utf-8-sig")


def _read_file(path: Path) -> list[str]:
    if _suffix(path) in (".json", ".jsonl"):
        return _texts_from_json(path)
    with _open_text(path) as f:
        return [f.read()]


def _local_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(LOCAL_SUFFIXES))
        if not files:
            raise DataError(f"{path}: no {'/'.join(LOCAL_SUFFIXES)} files in this directory")
        return files
    if path.is_file():
        return [path]
    if path.exists():  # a device, a FIFO, a socket: nothing to sample from
        raise DataError(f"{path}: not a regular file or directory; pass a text/.json/.jsonl file or a directory")
    raise DataError(f"{path}: no such file or directory")


def read_local_documents(path: str | Path) -> list[str]:
    """The documents under a local file or directory (sorted by path): one per .txt file, one per JSON entry."""
    path = Path(path)
    docs: list[str] = []
    for f in _local_files(path):
        try:
            docs.extend(_read_file(f))
        except UnicodeDecodeError as exc:
            raise DataError(f"{f}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
        except (OSError, EOFError) as exc:  # a damaged .gz
            raise DataError(f"{f}: cannot read it ({exc})") from exc
        except json.JSONDecodeError as exc:
            raise DataError(f"{f}: invalid JSON ({exc.msg}, line {exc.lineno})") from exc
    if not any(doc.strip() for doc in docs):
        raise DataError(f"{path}: no text found")
    return docs


def read_local_text(path: str | Path) -> str:
    """All text under a local file or directory (its documents, sorted by path), joined with blank lines."""
    return LOCAL_DOC_JOIN.join(read_local_documents(path))


def _only_json_documents(path: Path) -> bool:
    return all(_suffix(f) in (".json", ".jsonl") for f in _local_files(path))


def _is_local(source: str | Path) -> bool:
    return isinstance(source, Path) or source not in HUB_SOURCES


def _check_local(source: str | Path) -> Path:
    path = Path(source)
    if not path.exists() and (isinstance(source, Path) or "/" in source or os.sep in source or path.suffix):
        raise DataError(f"{source}: no such file or directory")
    if not path.exists():
        raise DataError(
            f"unknown data source {str(source)!r}: use {' or '.join(map(repr, HUB_SOURCES))}, "
            "or a path to a text/.json/.jsonl file or a directory of them"
        )
    return path


# ----------------------------------------------------------------------------------------------------------------------
# hub datasets


def _offline_hint(source: str) -> str:
    return (
        f"pass a local text file or directory instead of {source!r} (e.g. a .txt file), "
        "or run once with network access / set HF_DATASETS_OFFLINE=1 to use a cached copy"
    )


def _load_hub_split(source: str, split: str, cache_dir: str | Path | None) -> Any:
    """Load one split of a hub dataset the way Wanda does; any failure becomes a DataError with a hint.

    The datasets cache comes first (``HF_DATASETS_CACHE``, where Wanda's ``load_dataset`` calls put them: it
    passes its ``--cache_dir`` to the model only), then ``cache_dir`` if given."""
    if not hub.datasets_offline() and not hub.reachable():
        raise DataError(
            f"cannot reach the Hugging Face Hub to download {source!r} {split} data; " + _offline_hint(source)
        )
    import datasets
    from datasets import load_dataset

    caches: list[str | None] = [None]
    if cache_dir is not None:  # first when it already holds this dataset: no second download
        holds_it = any(Path(cache_dir).glob(f"*___{(C4_REPO if source == 'c4' else WIKITEXT_REPO).split('/')[1]}*"))
        caches.insert(0 if holds_it else 1, str(cache_dir))
    failures = []
    for cache in caches:
        try:
            if source == "c4":
                data_file = C4_TRAIN_FILE if split == "train" else C4_VALIDATION_FILE
                return load_dataset(C4_REPO, data_files={split: data_file}, split=split, cache_dir=cache)
            return load_dataset(WIKITEXT_REPO, WIKITEXT_CONFIG, split=split, cache_dir=cache)
        except Exception as exc:  # datasets raises ConnectionError, FileNotFoundError, DatasetNotFoundError, ...
            first_line = (str(exc).strip().splitlines() or [""])[0]
            failures.append(f"{cache or str(datasets.config.HF_DATASETS_CACHE)!r}: {type(exc).__name__}: {first_line}")
            last = exc
    raise DataError(
        f"could not load {source!r} {split} split ({'; '.join(failures)}); " + _offline_hint(source)
    ) from last


def _c4_calibration(docs: Any, tokenizer: Any, nsamples: int, seqlen: int, seed: int, what: str = "c4") -> torch.Tensor:
    """Wanda's C4 sampling: random documents longer than seqlen tokens, one random window from each. ``docs``:
    rows with a "text" field (a datasets.Dataset) or plain strings."""
    rng = random.Random(seed)
    n_docs = len(docs)
    samples = []
    max_tries = 1000 * max(nsamples, 1)
    tries = 0
    for _ in range(nsamples):
        while True:
            tries += 1
            if tries > max_tries:
                raise DataOptionError(
                    f"{quote(what)}: found no document longer than seqlen={seqlen} tokens in {tries - 1} draws; "
                    "use longer documents or a smaller {seqlen}"
                )
            doc = docs[rng.randint(0, n_docs - 1)]
            doc_ids = tokenize(tokenizer, doc if isinstance(doc, str) else doc["text"])
            if doc_ids.shape[1] > seqlen:
                break
        start = rng.randint(0, doc_ids.shape[1] - seqlen - 1)
        samples.append(doc_ids[0, start : start + seqlen])
    return torch.stack(samples)


# ----------------------------------------------------------------------------------------------------------------------
# public API


def get_calibration_ids(
    source: str | Path,
    tokenizer: Any,
    nsamples: int,
    seqlen: int,
    seed: int = 0,
    cache_dir: str | Path | None = None,
) -> torch.Tensor:
    """Calibration batch [nsamples, seqlen] (LongTensor) of random token windows from `source`.

    "c4": Wanda's sampling from the first C4 train shard. "wikitext2": windows of the train split joined with " ".
    A local path of .json/.jsonl documents: sampled as C4 is (the local C4 shard gives the same windows as "c4").
    Other local text: tokenized once, windows drawn from it. Deterministic for a given seed.
    """
    if nsamples < 1 or seqlen < 1:
        raise DataError(f"nsamples and seqlen must be positive, got nsamples={nsamples}, seqlen={seqlen}")
    if _is_local(source):
        path = _check_local(source)
        docs = read_local_documents(path) if _only_json_documents(path) else None
        # A document of b UTF-8 bytes has at most b + 2 tokens (byte-level BPE or byte fallback, BOS/EOS): if none
        # can be longer than seqlen, C4's sampling would draw in vain; windows across documents it is.
        if docs is not None and not any(len(doc.encode()) + 2 > seqlen for doc in docs):
            logger.warning("%s: no document can be longer than seqlen=%d tokens: sampling windows of the documents "
                           "joined, as for plain text", path, seqlen)  # fmt: skip
            docs = None
        if docs is not None:
            out = _c4_calibration(docs, tokenizer, nsamples, seqlen, seed, what=str(path))
        else:
            ids = tokenize(tokenizer, read_local_text(path))
            out = _random_windows(ids, nsamples, seqlen, seed, what=str(path))
    elif source == "c4":
        out = _c4_calibration(_load_hub_split("c4", "train", cache_dir), tokenizer, nsamples, seqlen, seed)
    else:
        train = _load_hub_split("wikitext2", "train", cache_dir)
        ids = tokenize(tokenizer, WIKITEXT_TRAIN_JOIN.join(train["text"]))
        out = _random_windows(ids, nsamples, seqlen, seed, what="wikitext2 train")
    logger.info("calibration data: %d x %d tokens from %s (seed %d)", nsamples, seqlen, source, seed)
    return out


def get_eval_ids(
    source: str | Path,
    tokenizer: Any,
    cache_dir: str | Path | None = None,
    seqlen: int | None = None,
) -> torch.Tensor:
    """Evaluation token ids [1, N] (LongTensor), tokenized once.

    "wikitext2": "\\n\\n".join(test split) (the published protocol). "c4": Wanda's validation slice, the first 1100
    documents of the first validation shard joined with " ", truncated to 256 * seqlen tokens (needs `seqlen`).
    A local path: its whole text.
    """
    if _is_local(source):
        path = _check_local(source)
        ids = tokenize(tokenizer, read_local_text(path))
    elif source == "wikitext2":
        test = _load_hub_split("wikitext2", "test", cache_dir)
        ids = tokenize(tokenizer, WIKITEXT_TEST_JOIN.join(test["text"]))
    else:
        if seqlen is None:
            raise DataError("c4 evaluation keeps the first 256 * seqlen tokens: pass seqlen")
        val = _load_hub_split("c4", "validation", cache_dir)
        ids = tokenize(tokenizer, " ".join(_first_texts(val, C4_EVAL_DOCS)))[:, : C4_EVAL_WINDOWS * seqlen]
    logger.info("evaluation data: %d tokens from %s", ids.shape[1], source)
    return ids


def _first_texts(dataset: Any, n: int) -> Iterable[str]:
    """The "text" field of the first n rows (works for a datasets.Dataset or a list of dicts)."""
    if hasattr(dataset, "select"):
        return dataset.select(range(min(n, len(dataset))))["text"]
    return [row["text"] for row in dataset[:n]]
