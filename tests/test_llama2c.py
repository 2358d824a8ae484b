"""llama2.c -> HF Llama conversion, checked on the real stories260K and against a plain-torch llama2.c forward."""

from __future__ import annotations

import math
import struct
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from bench.fixtures.llama2c import llama2c_to_hf_model, load_llama2c, read_llama2c_vocab, save_llama2c_as_hf
from pruning.data import get_eval_ids
from pruning.evaluate import perplexity

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
STORIES = SHARED_DATA / "stories260K"
CKPT, TOK = STORIES / "stories260K.bin", STORIES / "tok512.bin"
TINYSTORIES = SHARED_DATA / "tinystories" / "tinystories_val_head.txt"

needs_stories = pytest.mark.skipif(not CKPT.is_file(), reason=f"shared stories260K data absent: {STORIES}")


# ----------------------------------------------------------------------------------------------------------------------
# independent references: llama2.c's format, forward pass and run.c tokenizer, written from its C/Python sources


def read_v0(path: Path) -> tuple[dict[str, int], dict[str, torch.Tensor]]:
    """Minimal reader of a legacy (v0) llama2.c checkpoint."""
    raw = path.read_bytes()
    names = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")
    p = dict(zip(names, struct.unpack_from("<7i", raw, 0), strict=True))
    floats = torch.tensor(struct.unpack_from(f"<{(len(raw) - 28) // 4}f", raw, 28))
    d, h, n, v, t = p["dim"], p["hidden_dim"], p["n_layers"], abs(p["vocab_size"]), p["seq_len"]
    kv = d * p["n_kv_heads"] // p["n_heads"]
    hs = d // p["n_heads"]
    shapes = [
        ("tok_emb", (v, d)),
        ("rms_att", (n, d)),
        ("wq", (n, d, d)),
        ("wk", (n, kv, d)),
        ("wv", (n, kv, d)),
        ("wo", (n, d, d)),
        ("rms_ffn", (n, d)),
        ("w1", (n, h, d)),
        ("w2", (n, d, h)),
        ("w3", (n, h, d)),
        ("rms_final", (d,)),
        ("freq_real", (t, hs // 2)),
        ("freq_imag", (t, hs // 2)),
    ]
    if p["vocab_size"] < 0:
        shapes.append(("wcls", (v, d)))
    w, pos = {}, 0
    for name, shape in shapes:
        w[name] = floats[pos : pos + math.prod(shape)].view(shape)
        pos += math.prod(shape)
    assert pos == floats.numel()
    w.setdefault("wcls", w["tok_emb"])
    return p, w


def llama2c_forward(p: dict[str, int], w: dict[str, torch.Tensor], tokens: list[int], theta: float) -> torch.Tensor:
    """llama2.c's model.py forward in float64: adjacent-pair RoPE, GQA with kv head = q head // (n_heads/n_kv)."""
    w = {k: v.double() for k, v in w.items()}
    n_heads, n_kv = p["n_heads"], p["n_kv_heads"]
    hs = p["dim"] // n_heads
    T = len(tokens)
    freqs = 1.0 / theta ** (torch.arange(0, hs, 2, dtype=torch.float64) / hs)
    ang = torch.outer(torch.arange(T, dtype=torch.float64), freqs)
    cos, sin = ang.cos()[:, None, :], ang.sin()[:, None, :]

    def rms(x, g):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * g

    def rope(x):  # x [T, heads, hs]; rotate (2i, 2i+1)
        x0, x1 = x[..., 0::2], x[..., 1::2]
        return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2)

    x = w["tok_emb"][torch.tensor(tokens)]
    mask = torch.full((T, T), float("-inf"), dtype=torch.float64).triu(1)
    for layer in range(p["n_layers"]):
        h = rms(x, w["rms_att"][layer])
        q = rope((h @ w["wq"][layer].T).view(T, n_heads, hs))
        k = rope((h @ w["wk"][layer].T).view(T, n_kv, hs)).repeat_interleave(n_heads // n_kv, dim=1)
        v = (h @ w["wv"][layer].T).view(T, n_kv, hs).repeat_interleave(n_heads // n_kv, dim=1)
        att = torch.einsum("thd,shd->hts", q, k) / math.sqrt(hs) + mask
        out = torch.einsum("hts,shd->thd", att.softmax(-1), v).reshape(T, -1)
        x = x + out @ w["wo"][layer].T
        h = rms(x, w["rms_ffn"][layer])
        x = x + (F.silu(h @ w["w1"][layer].T) * (h @ w["w3"][layer].T)) @ w["w2"][layer].T
    return rms(x, w["rms_final"]) @ w["wcls"].T


def read_runc_vocab(path: Path) -> tuple[list[bytes], list[float]]:
    raw = path.read_bytes()
    pos, pieces, scores = 4, [], []
    while pos < len(raw):
        score, n = struct.unpack_from("<fi", raw, pos)
        pieces.append(raw[pos + 8 : pos + 8 + n])
        scores.append(score)
        pos += 8 + n
    return pieces, scores


def runc_encode(text: str, pieces: list[bytes], scores: list[float]) -> list[int]:
    """run.c encode(bos=1, eos=0): dummy " " prefix, chars or byte fallback, then best-score pair merges."""
    lookup = {piece: i for i, piece in enumerate(pieces)}
    tokens = [1]
    if text:
        tokens.append(lookup[b" "])
    for ch in text:
        b = ch.encode("utf-8")
        tokens.extend([lookup[b]] if b in lookup else [byte + 3 for byte in b])
    while True:
        best, best_i, best_id = -1e10, -1, -1
        for i in range(len(tokens) - 1):
            merged = lookup.get(pieces[tokens[i]] + pieces[tokens[i + 1]])
            if merged is not None and scores[merged] > best:  # strict: leftmost wins ties
                best, best_i, best_id = scores[merged], i, merged
        if best_i < 0:
            return tokens
        tokens[best_i : best_i + 2] = [best_id]


def runc_decode(tokens: list[int], pieces: list[bytes]) -> str:
    """run.c decode + safe_printf, piece by piece: strip the space after BOS, <0xXX> -> byte."""
    out = b""
    for prev, tok in zip(tokens[:-1], tokens[1:], strict=True):
        piece = pieces[tok]
        if prev == 1 and piece.startswith(b" "):
            piece = piece[1:]
        if len(piece) == 6 and piece.startswith(b"<0x") and piece.endswith(b">"):
            piece = bytes([int(piece[3:5], 16)])
        if len(piece) == 1 and not (chr(piece[0]).isprintable() or chr(piece[0]).isspace()) and piece[0] < 128:
            continue
        out += piece
    return out.decode("utf-8")


def greedy(model, n_steps: int) -> list[int]:
    """run.c -t 0 -n n_steps from an empty prompt: greedy from BOS, stopping early only if BOS is generated."""
    with torch.no_grad():
        out = model.generate(
            torch.tensor([[1]]), max_new_tokens=n_steps, do_sample=False, eos_token_id=1, pad_token_id=0
        )
    return out[0].tolist()


@pytest.fixture(scope="module")
def stories():
    if not CKPT.is_file():
        pytest.skip(f"shared stories260K data absent: {STORIES}")
    return load_llama2c(CKPT, TOK)


# ----------------------------------------------------------------------------------------------------------------------
# real checkpoint


@needs_stories
def test_stories260k_config(stories):
    model, tok = stories
    c = model.config
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (64, 172, 5)
    assert (c.num_attention_heads, c.num_key_value_heads, c.vocab_size, c.max_position_embeddings) == (8, 4, 512, 512)
    assert c.rms_norm_eps == 1e-5 and c.rope_parameters["rope_theta"] == 10000.0
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # shared classifier
    assert next(model.parameters()).dtype == torch.float32
    per_layer = 2 * 64 + 2 * 64 * 64 + 2 * 32 * 64 + 3 * 64 * 172  # norms, wq+wo, wk+wv, w1+w2+w3
    assert sum(p.numel() for p in model.parameters()) == 512 * 64 + 5 * per_layer + 64
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id, len(tok)) == (1, 2, 0, 512)


@needs_stories
def test_stories260k_logits_match_llama2c_forward(stories):
    model, tok = stories
    p, w = read_v0(CKPT)
    tokens = tok("Once upon a time, Lily found a shiny red ball in the park.").input_ids
    ref = llama2c_forward(p, w, tokens, theta=10000.0)
    with torch.no_grad():
        got = model(input_ids=torch.tensor([tokens])).logits[0].double()
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


@needs_stories
def test_stories260k_greedy_matches_llama2c(stories):
    model, tok = stories
    expected = (STORIES / "EXPECTED_GREEDY.txt").read_bytes().decode("utf-8")
    tokens = greedy(model, 200)  # run.c -t 0 -n 200: 200 tokens after BOS
    assert len(tokens) == 201 and 1 not in tokens[1:]
    assert tok.decode(tokens, skip_special_tokens=True) == expected
    pieces, _ = read_runc_vocab(TOK)
    assert runc_decode(tokens, pieces) == expected


@needs_stories
def test_tokenizer_matches_runc(stories):
    _, tok = stories
    pieces, scores = read_runc_vocab(TOK)
    text = TINYSTORIES.read_text(encoding="utf-8") if TINYSTORIES.is_file() else ""
    samples = [s for s in text.split("\n\n")[:40] if s] + [
        text[:3000],
        "",
        "Hello",
        "  two  spaces\n\nand\ttabs ",
        "héllo wörld ☃ 日本 “quoted” — …",
        "a <s> b</s><unk>",
    ]
    for s in samples:
        ids = tok(s).input_ids
        assert ids == runc_encode(s, pieces, scores), s[:60]
        assert tok.decode(ids, skip_special_tokens=True) == s


@needs_stories
@pytest.mark.skipif(not TINYSTORIES.is_file(), reason=f"shared TinyStories text absent: {TINYSTORIES}")
def test_stories260k_dense_perplexity(stories, tmp_path):
    """SOURCE.txt: loss 1.426 nats/token (ppl 4.16) on the first 60k chars, 256-token windows.

    A wrong rotary permutation, classifier or label shift moves this by far more than the +-0.05 allowed,
    which only absorbs fp32 summation-order differences between BLAS/attention kernels.
    """
    model, tok = stories
    head = tmp_path / "tinystories_60k.txt"
    head.write_text(TINYSTORIES.read_text(encoding="utf-8")[:60_000], encoding="utf-8")
    ids = get_eval_ids(head, tok)
    assert ids.shape == (1, 28_770)
    ppl = perplexity(model, ids, seqlen=256, batch_size=16, progress=False)
    assert abs(ppl - 4.16) < 0.05, ppl


@needs_stories
def test_save_as_hf_roundtrip(stories, tmp_path):
    model, tok = stories
    save_llama2c_as_hf(CKPT, TOK, tmp_path / "hf")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    loaded_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "The cat sat on the mat. 日本"
    assert loaded_tok(text).input_ids == tok(text).input_ids
    ids = torch.tensor([tok(text).input_ids])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


# ----------------------------------------------------------------------------------------------------------------------
# synthetic checkpoints: v0 with its own classifier and a non-default theta, v1 header


def write_checkpoint(path: Path, version: int, shared: bool, theta: float, seed: int = 0) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(seed)
    p = {"dim": 16, "hidden_dim": 24, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 40, "seq_len": 32}
    d, h, n, v, t = p["dim"], p["hidden_dim"], p["n_layers"], p["vocab_size"], p["seq_len"]
    kv, hs = d * p["n_kv_heads"] // p["n_heads"], d // p["n_heads"]

    def rnd(*shape):
        return torch.randn(*shape, generator=g) * 0.3

    w = {
        "tok_emb": rnd(v, d),
        "rms_att": 1 + rnd(n, d),
        "wq": rnd(n, d, d),
        "wk": rnd(n, kv, d),
        "wv": rnd(n, kv, d),
        "wo": rnd(n, d, d),
        "rms_ffn": 1 + rnd(n, d),
        "w1": rnd(n, h, d),
        "w2": rnd(n, d, h),
        "w3": rnd(n, h, d),
        "rms_final": 1 + rnd(d),
    }
    w["wcls"] = w["tok_emb"] if shared else rnd(v, d)
    ang = torch.outer(torch.arange(t).float(), 1.0 / theta ** (torch.arange(0, hs, 2).float() / hs))
    w["freq_real"], w["freq_imag"] = ang.cos(), ang.sin()
    header = [d, h, n, p["n_heads"], p["n_kv_heads"], v, t]

    def f32(x):
        return x.contiguous().float().numpy().tobytes()

    with open(path, "wb") as f:
        if version == 0:
            header[5] = v if shared else -v
            f.write(struct.pack("<7i", *header))
            for name in (
                "tok_emb",
                "rms_att",
                "wq",
                "wk",
                "wv",
                "wo",
                "rms_ffn",
                "w1",
                "w2",
                "w3",
                "rms_final",
                "freq_real",
                "freq_imag",
            ):
                f.write(f32(w[name]))
        else:
            f.write(struct.pack("<Ii7iB", 0x616B3432, 1, *header, int(shared)))
            f.write(b"\0" * (256 - f.tell()))
            for name in ("rms_att", "rms_ffn", "rms_final", "tok_emb", "wq", "wk", "wv", "wo", "w1", "w2", "w3"):
                f.write(f32(w[name]))
        if not shared:
            f.write(f32(w["wcls"]))
    return p, w


@pytest.mark.parametrize(
    "version,shared,theta", [(0, False, 500000.0), (0, True, 10000.0), (1, False, 10000.0), (1, True, 10000.0)]
)
def test_synthetic_checkpoint_matches_reference(tmp_path, version, shared, theta):
    path = tmp_path / "tiny.bin"
    p, w = write_checkpoint(path, version, shared, theta)
    model = llama2c_to_hf_model(path)
    assert model.config.rope_parameters["rope_theta"] == theta
    assert model.config.tie_word_embeddings == shared
    assert (model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()) == shared
    tokens = torch.randint(0, 40, (20,), generator=torch.Generator().manual_seed(1)).tolist()
    ref = llama2c_forward(p, w, tokens, theta)
    with torch.no_grad():
        got = model(input_ids=torch.tensor([tokens])).logits[0].double()
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_truncated_checkpoint_is_rejected(tmp_path):
    path = tmp_path / "tiny.bin"
    write_checkpoint(path, 0, True, 10000.0)
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(ValueError, match="implies"):
        llama2c_to_hf_model(path)


@pytest.mark.parametrize("keep", ["-3 bytes", "20 bytes", "header only", "v1 magic only"])
def test_damaged_checkpoints_are_value_errors_naming_the_file(tmp_path, keep):
    path = tmp_path / "tiny.bin"
    write_checkpoint(path, 1 if keep == "v1 magic only" else 0, True, 10000.0)
    raw = path.read_bytes()
    cut = {"-3 bytes": raw[:-3], "20 bytes": raw[:20], "header only": raw[:28], "v1 magic only": raw[:8]}[keep]
    path.write_bytes(cut)
    with pytest.raises(ValueError, match=f"{path}.*truncated"):
        llama2c_to_hf_model(path)


@pytest.mark.parametrize("cut", [2, 5])
def test_a_truncated_tokenizer_file_is_refused(tmp_path, cut):
    if not TOK.is_file():
        pytest.skip(f"shared stories260K data absent: {STORIES}")
    path = tmp_path / "tok512.bin"
    path.write_bytes(TOK.read_bytes()[:-cut])
    with pytest.raises(ValueError, match="truncated"):
        read_llama2c_vocab(path, 512)
