"""Calibration / evaluation ids: Wanda's window sampling, local files, and clear failures offline."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest
import torch

from pruning import data, hub
from pruning.data import DataError, get_calibration_ids, get_eval_ids
from pruning.tokenizers import byte_level_tokenizer

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
WIKI_TOKENS = SHARED_DATA / "wikitext2" / "wiki.valid.tokens"

# Varied text so windows from different starts differ (the byte tokenizer makes 1 token per byte).
TEXT = "\n\n".join(
    f"Story {i}: the {'quick' if i % 3 else 'slow'} fox number {i * 7919 % 1000} jumps." for i in range(60)
)


@pytest.fixture(scope="module")
def tok():
    return byte_level_tokenizer()


@pytest.fixture()
def text_file(tmp_path) -> Path:
    path = tmp_path / "calib.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def full_ids(tok, text: str = TEXT) -> torch.Tensor:
    return torch.tensor(tok(text).input_ids)


def window_starts(ids: torch.Tensor, windows: torch.Tensor) -> list[int]:
    """Start offset of each window inside ids (asserting it is a contiguous substring)."""
    seqlen = windows.shape[1]
    all_windows = ids.unfold(0, seqlen, 1)  # [N - seqlen + 1, seqlen]
    starts = []
    for w in windows:
        hits = (all_windows == w).all(dim=1).nonzero().flatten()
        assert hits.numel() > 0, "window is not a substring of the tokenized text"
        starts.append(int(hits[0]))
    return starts


def test_local_file_shape_dtype_and_substrings(tok, text_file):
    out = get_calibration_ids(text_file, tok, nsamples=8, seqlen=64, seed=0)
    assert out.shape == (8, 64) and out.dtype == torch.long
    window_starts(full_ids(tok), out)


def test_local_file_follows_wanda_draws(tok, text_file):
    """Same starts as Wanda: random.seed(seed); random.randint(0, N - seqlen - 1) per sample."""
    ids = full_ids(tok)
    out = get_calibration_ids(str(text_file), tok, nsamples=5, seqlen=100, seed=3)
    random.seed(3)
    expected = torch.stack([ids[s : s + 100] for s in [random.randint(0, ids.numel() - 101) for _ in range(5)]])
    assert torch.equal(out, expected)


def test_determinism_per_seed(tok, text_file):
    a = get_calibration_ids(text_file, tok, nsamples=6, seqlen=50, seed=7)
    b = get_calibration_ids(text_file, tok, nsamples=6, seqlen=50, seed=7)
    c = get_calibration_ids(text_file, tok, nsamples=6, seqlen=50, seed=8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_too_short_text_reports_token_count(tok, tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("tiny text", encoding="utf-8")  # 9 bytes + </s> = 10 tokens
    with pytest.raises(DataError, match=r"only 10 tokens.*seqlen=10"):
        get_calibration_ids(path, tok, nsamples=1, seqlen=10)
    assert get_calibration_ids(path, tok, nsamples=2, seqlen=9).shape == (2, 9)


def test_directory_of_txt_json_jsonl(tok, tmp_path):
    (tmp_path / "b.txt").write_text("second file", encoding="utf-8")
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "first doc"}) + "\n\n" + json.dumps("bare string") + "\n")
    (tmp_path / "c.json").write_text(json.dumps([{"text": "json one"}, "json two"]))
    (tmp_path / "ignored.csv").write_text("not read")
    expected = "first doc\n\nbare string\n\nsecond file\n\njson one\n\njson two"
    ids = get_eval_ids(tmp_path, tok)
    assert ids.shape == (1, len(expected.encode()) + 1)
    assert torch.equal(ids[0], full_ids(tok, expected))
    calib = get_calibration_ids(tmp_path, tok, nsamples=3, seqlen=20, seed=1)
    window_starts(ids[0], calib)


def test_local_eval_ids_are_whole_text_tokenized_once(tok, text_file):
    ids = get_eval_ids(text_file, tok)
    assert ids.dtype == torch.long and torch.equal(ids[0], full_ids(tok))


@pytest.mark.skipif(not WIKI_TOKENS.is_file(), reason=f"shared WikiText-2 data absent: {WIKI_TOKENS}")
def test_real_text_file(tok):
    out = get_calibration_ids(WIKI_TOKENS, tok, nsamples=4, seqlen=256, seed=0)
    assert out.shape == (4, 256)
    text = WIKI_TOKENS.read_text(encoding="utf-8")
    for row in out:
        assert tok.decode(row, skip_special_tokens=True)[3:-3] in text  # edges may cut a UTF-8 character


def test_unknown_source_and_bad_json(tok, tmp_path):
    with pytest.raises(DataError, match="unknown data source 'c5'"):
        get_calibration_ids("c5", tok, nsamples=1, seqlen=8)
    with pytest.raises(DataError, match="missing.txt: no such file"):
        get_calibration_ids(tmp_path / "missing.txt", tok, nsamples=1, seqlen=8)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"content": "x"}]))
    with pytest.raises(DataError, match="text"):
        get_eval_ids(bad, tok)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        get_eval_ids(tmp_path / "latin1.txt", tok)
    (tmp_path / "broken.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(DataError, match="invalid JSON"):
        get_eval_ids(tmp_path / "broken.jsonl", tok)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .txt"):
        get_eval_ids(tmp_path / "empty", tok)


@pytest.mark.parametrize("source", ["c4", "wikitext2"])
def test_hub_unreachable_fails_fast_with_hint(tok, monkeypatch, source):
    monkeypatch.setattr(hub, "datasets_offline", lambda: False)
    monkeypatch.setattr(hub, "reachable", lambda timeout_s=3.0: False)
    t0 = time.perf_counter()
    with pytest.raises(DataError, match="local text file"):
        get_calibration_ids(source, tok, nsamples=1, seqlen=8)
    with pytest.raises(DataError, match="cannot reach the Hugging Face Hub"):
        get_eval_ids(source, tok, seqlen=8)
    assert time.perf_counter() - t0 < 5


def test_hub_loader_errors_are_wrapped(tok, monkeypatch):
    import datasets

    def refuse(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'allenai/c4' on the Hub (LocalEntryNotFoundError)\nRetrying...")

    monkeypatch.setattr(hub, "datasets_offline", lambda: True)  # cache-only mode: no probe, load_dataset decides
    monkeypatch.setattr(datasets, "load_dataset", refuse)
    with pytest.raises(DataError, match=r"could not load 'c4' train split \(.*ConnectionError.*local text") as err:
        get_calibration_ids("c4", tok, nsamples=1, seqlen=8)
    assert "\n" not in str(err.value)


def test_hub_datasets_come_from_the_datasets_cache_then_cache_dir(tok, monkeypatch, tmp_path):
    """Wanda passes --cache_dir to the model only: its datasets live in HF_DATASETS_CACHE. Both are searched."""
    import datasets

    tried = []

    def cached_only_in(where):
        def load(*args, cache_dir=None, **kwargs):
            tried.append(cache_dir)
            if cache_dir != where:
                raise ConnectionError("not cached here")
            return {"text": ["", " A cached train split , long enough for windows . \n"] * 20}

        return load

    monkeypatch.setattr(hub, "datasets_offline", lambda: True)
    monkeypatch.setattr(datasets, "load_dataset", cached_only_in(None))
    get_calibration_ids("wikitext2", tok, nsamples=1, seqlen=8, cache_dir=tmp_path / "llm_weights")
    assert tried == [None]  # the datasets cache, as Wanda loads it
    tried.clear()
    monkeypatch.setattr(datasets, "load_dataset", cached_only_in(str(tmp_path / "llm_weights")))
    get_calibration_ids("wikitext2", tok, nsamples=1, seqlen=8, cache_dir=tmp_path / "llm_weights")
    assert tried == [None, str(tmp_path / "llm_weights")]
    tried.clear()  # a --cache_dir that already holds the dataset (an earlier run put it there) comes first
    (tmp_path / "llm_weights" / "Salesforce___wikitext").mkdir(parents=True)
    get_calibration_ids("wikitext2", tok, nsamples=1, seqlen=8, cache_dir=tmp_path / "llm_weights")
    assert tried == [str(tmp_path / "llm_weights")]
    monkeypatch.setattr(datasets, "load_dataset", cached_only_in("elsewhere"))
    with pytest.raises(DataError, match=str(datasets.config.HF_DATASETS_CACHE)) as err:
        get_calibration_ids("wikitext2", tok, nsamples=1, seqlen=8, cache_dir=tmp_path / "llm_weights")
    assert str(tmp_path / "llm_weights") in str(err.value)


@pytest.mark.parametrize("name", ["c4-train.00000-of-01024.json", "c4-train.00000-of-01024.json.gz", "docs.jsonl"])
def test_local_json_documents_are_sampled_as_wanda_samples_c4(name, tok, tmp_path):
    """The C4 shard as published (JSON Lines, gzip, under a .json name) gives the windows --calib_dataset c4 would."""
    import gzip

    docs = [{"text": f"doc {i} " + "x" * (i % 5) * 30 + f" end {i}", "url": f"u{i}"} for i in range(50)]
    lines = "".join(json.dumps(d) + "\n" for d in docs)
    path = tmp_path / name
    path.write_bytes(gzip.compress(lines.encode()) if name.endswith(".gz") else lines.encode())
    seqlen, nsamples, seed = 64, 6, 5
    out = get_calibration_ids(path, tok, nsamples=nsamples, seqlen=seqlen, seed=seed)
    assert torch.equal(out, wandas_c4_windows(tok, docs, nsamples, seqlen, seed))


def test_a_byte_order_mark_is_not_text(tok, tmp_path):
    for name, body in (("a.txt", TEXT), ("b.json", json.dumps([TEXT]))):
        path = tmp_path / name
        path.write_bytes(b"\xef\xbb\xbf" + body.encode())
        assert torch.equal(get_eval_ids(path, tok)[0], full_ids(tok))


@pytest.mark.parametrize("which", ["byte-level", "opt"])
def test_a_long_text_tokenized_in_pieces_gives_the_ids_of_one_call(which, tok, monkeypatch):
    if which == "opt":
        if not (SHARED_DATA / "gpt2_tokenizer").is_dir():
            pytest.skip(f"shared test data not found at {SHARED_DATA}")
        from bench.fixtures.opt_tokenizer import build_opt_tokenizer

        tok = build_opt_tokenizer(SHARED_DATA / "gpt2_tokenizer")
        text = (SHARED_DATA / "wikitext2" / "wiki.test.raw.joined.txt").read_text()[:200_000]
    else:
        text = TEXT * 20 + "\n\n   indented line\n\tand a tab\n" + TEXT
    whole = data.tokenize(tok, text)
    monkeypatch.setattr(data, "TOKENIZE_PIECE_CHARS", 997)
    calls = []

    def counting(piece, **kwargs):
        calls.append(len(piece))
        return tok(piece, **kwargs)

    pieces = data.tokenize(counting, text)
    assert len(calls) > 50  # WikiText's lines start with a space: cut there too
    assert pieces.dtype == torch.long and torch.equal(pieces, whole)


def wandas_c4_windows(tok, docs: list[dict], nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """locuslab/wanda's get_c4 loop, verbatim logic: a random document longer than seqlen, a random window."""
    random.seed(seed)
    expected = []
    for _ in range(nsamples):
        while True:
            enc = tok(docs[random.randint(0, len(docs) - 1)]["text"], return_tensors="pt").input_ids
            if enc.shape[1] > seqlen:
                break
        i = random.randint(0, enc.shape[1] - seqlen - 1)
        expected.append(enc[0, i : i + seqlen])
    return torch.stack(expected)


def fake_hub(monkeypatch, splits: dict) -> list:
    calls = []

    def load(source, split, cache_dir):
        calls.append((source, split))
        return splits[(source, split)]

    monkeypatch.setattr(data, "_load_hub_split", load)
    return calls


def test_c4_calibration_is_wandas_sampling(tok, monkeypatch):
    docs = [{"text": f"doc {i} " + "x" * (i % 5) * 30 + f" end {i}"} for i in range(50)]  # many too short
    calls = fake_hub(monkeypatch, {("c4", "train"): docs})
    seqlen, nsamples, seed = 64, 6, 5
    out = get_calibration_ids("c4", tok, nsamples=nsamples, seqlen=seqlen, seed=seed)
    assert calls == [("c4", "train")]

    assert torch.equal(out, wandas_c4_windows(tok, docs, nsamples, seqlen, seed))


def test_c4_without_long_documents_fails(tok, monkeypatch):
    fake_hub(monkeypatch, {("c4", "train"): [{"text": "short"}] * 3})
    with pytest.raises(DataError, match="no document longer than seqlen=64"):
        get_calibration_ids("c4", tok, nsamples=1, seqlen=64)


def test_wikitext2_protocols(tok, monkeypatch):
    train = {"text": ["", " = Title = \n", "", " Some train text here . \n"] * 20}
    test = {"text": ["", " = Test = \n", "", " Test body , with words . \n", ""]}
    fake_hub(monkeypatch, {("wikitext2", "train"): train, ("wikitext2", "test"): test})
    ids = get_eval_ids("wikitext2", tok)
    assert torch.equal(ids[0], full_ids(tok, "\n\n".join(test["text"])))
    calib = get_calibration_ids("wikitext2", tok, nsamples=3, seqlen=32, seed=0)
    # Wanda's get_wikitext2: train joined with " ", then random.seed(seed); randint(0, N - seqlen - 1) per sample.
    train_ids = full_ids(tok, " ".join(train["text"]))
    random.seed(0)
    starts = [random.randint(0, train_ids.numel() - 33) for _ in range(3)]
    assert torch.equal(calib, torch.stack([train_ids[s : s + 32] for s in starts]))


def test_c4_eval_slice(tok, monkeypatch):
    val = [{"text": f"v{i}"} for i in range(1500)]
    fake_hub(monkeypatch, {("c4", "validation"): val})
    with pytest.raises(DataError, match="pass seqlen"):
        get_eval_ids("c4", tok)
    joined = full_ids(tok, " ".join(d["text"] for d in val[:1100]))
    ids = get_eval_ids("c4", tok, seqlen=8)
    assert torch.equal(ids[0], joined[: 256 * 8])
    ids_long = get_eval_ids("c4", tok, seqlen=1000)  # fewer tokens than 256 * seqlen: keep them all
    assert torch.equal(ids_long[0], joined)


def test_json_documents_all_shorter_than_seqlen_are_sampled_as_joined_text(tok, tmp_path):
    docs = [f"short document {i}" for i in range(40)]  # 17-19 bytes each: none can exceed 32 tokens
    (tmp_path / "short.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    out = get_calibration_ids(tmp_path / "short.jsonl", tok, nsamples=4, seqlen=32, seed=3)
    joined = full_ids(tok, "\n\n".join(docs))
    random.seed(3)
    starts = [random.randint(0, joined.numel() - 33) for _ in range(4)]
    assert torch.equal(out, torch.stack([joined[s : s + 32] for s in starts]))
