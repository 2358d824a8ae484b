"""Convert Karpathy's llama2.c checkpoints (e.g. tinyllamas stories260K) to Hugging Face Llama.

Checkpoint (`.bin`), two fp32 layouts written by llama2.c's export.py:
- v0 ("legacy"): 7 int32 header (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len), a negative
  vocab_size meaning "classifier NOT shared with the embedding"; then tok_emb[V,D], rms_att[L,D], wq[L,D,D],
  wk[L,KV,D], wv[L,KV,D], wo[L,D,D], rms_ffn[L,D], w1[L,H,D], w2[L,D,H], w3[L,H,D], rms_final[D],
  freq_cis_real[T,hs/2], freq_cis_imag[T,hs/2], then wcls[V,D] when not shared.
- v1: magic "ak42", version 1, the same 7 int32, a uint8 shared-classifier flag, zero padding to 256 bytes; then
  rms_att, rms_ffn, rms_final, tok_emb, wq, wk, wv, wo, w1, w2, w3 and wcls when not shared.
Weights are [out, in] (torch Linear layout). llama2.c's RoPE rotates adjacent pairs (2i, 2i+1) (Meta layout);
HF Llama rotates (i, i + hs/2), so wq/wk rows are permuted per head like llama2.c's export.py / HF's
convert_llama_weights_to_hf.py do.

Tokenizer (`tok*.bin`): int32 max_token_len, then per token (float32 score, int32 len, bytes). 0=<unk>, 1=<s>, 2=</s>,
3..258 byte fallback <0xXX>, the rest merged pieces with real spaces. run.c encodes by prepending " ", mapping each
UTF-8 character to its piece (else its bytes + 3), then repeatedly merging the adjacent pair whose concatenation is
the highest-scoring piece. The HF BPE below reproduces that: one merge per (left, right) split of every piece,
ranked by the merged piece's score, applied to the whole text as a single word.
"""

from __future__ import annotations

import logging
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

_V1_MAGIC = 0x616B3432  # "ak42"
_V1_HEADER_BYTES = 256
_SPECIAL_NAMES = {0: "<unk>", 1: "<s>", 2: "</s>"}


@dataclass(frozen=True)
class Llama2cConfig:
    """Model shape from a llama2.c checkpoint header."""

    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    seq_len: int
    shared_classifier: bool
    version: int

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


def _read_header(raw: bytes) -> tuple[Llama2cConfig, int]:
    """Parse the header; returns the config and the byte offset of the first weight."""
    (magic,) = struct.unpack_from("<I", raw, 0)
    if magic == _V1_MAGIC:
        (version,) = struct.unpack_from("<i", raw, 4)
        if version != 1:
            raise ValueError(f"llama2.c checkpoint version {version} is not supported (only fp32 v0 and v1)")
        params = struct.unpack_from("<7i", raw, 8)
        (shared,) = struct.unpack_from("<B", raw, 36)
        return Llama2cConfig(*params, shared_classifier=bool(shared), version=1), _V1_HEADER_BYTES
    dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len = struct.unpack_from("<7i", raw, 0)
    cfg = Llama2cConfig(
        dim,
        hidden_dim,
        n_layers,
        n_heads,
        n_kv_heads,
        abs(vocab_size),
        seq_len,
        shared_classifier=vocab_size > 0,
        version=0,
    )
    return cfg, 7 * 4


def _permute_for_hf_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder q/k projection rows per head from adjacent-pair RoPE (2i, 2i+1) to HF's rotate_half (i, i+hs/2)."""
    out_dim, in_dim = w.shape
    return w.view(n_heads, out_dim // n_heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def _rope_theta_from_freqs(freq_real: torch.Tensor, freq_imag: torch.Tensor, head_dim: int) -> float:
    """Recover theta from the stored cos/sin table: the angle at t=1 of the last pair i = hs/2 - 1 is
    theta^(-(hs - 2) / hs); the last pair keeps the fp32 round-off in theta smallest."""
    if freq_real.shape[0] < 2 or head_dim < 4:
        return 10000.0
    angle = math.atan2(float(freq_imag[1, -1]), float(freq_real[1, -1]))
    if not 0.0 < angle < 1.0:
        logger.warning("unreadable RoPE table in checkpoint (angle %g); assuming theta 10000", angle)
        return 10000.0
    theta = angle ** (-head_dim / (head_dim - 2))
    return float(f"{theta:.6g}")  # the table is fp32; thetas in use are round numbers (1e4, 5e5, 1e6)


def _read_weights(path: Path) -> tuple[Llama2cConfig, dict[str, torch.Tensor], float]:
    """Read a llama2.c checkpoint into llama2.c-named fp32 tensors (plus the RoPE theta it was exported with)."""
    raw = path.read_bytes()
    v1 = len(raw) >= 4 and struct.unpack_from("<I", raw, 0)[0] == _V1_MAGIC
    header_bytes = _V1_HEADER_BYTES if v1 else 7 * 4
    if len(raw) <= header_bytes or len(raw) % 4:
        raise ValueError(
            f"{path}: {len(raw)} bytes is not a llama2.c checkpoint (a {header_bytes}-byte header, then fp32 "
            "weights: a multiple of 4 bytes); the file may be truncated"
        )
    cfg, offset = _read_header(raw)
    if min(cfg.dim, cfg.hidden_dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.vocab_size, cfg.seq_len) <= 0:
        raise ValueError(f"{path}: implausible llama2.c header {cfg}")
    if cfg.dim % cfg.n_heads or cfg.n_heads % cfg.n_kv_heads:
        raise ValueError(f"{path}: dim {cfg.dim} / n_heads {cfg.n_heads} / n_kv_heads {cfg.n_kv_heads} do not divide")
    flat = torch.frombuffer(bytearray(raw[offset:]), dtype=torch.float32)
    dim, hid, n_layers, vocab = cfg.dim, cfg.hidden_dim, cfg.n_layers, cfg.vocab_size
    kv_dim = cfg.n_kv_heads * cfg.head_dim
    half_hs = cfg.head_dim // 2

    shapes: dict[str, tuple[int, ...]] = {
        "tok_emb": (vocab, dim),
        "rms_att": (n_layers, dim),
        "wq": (n_layers, dim, dim),
        "wk": (n_layers, kv_dim, dim),
        "wv": (n_layers, kv_dim, dim),
        "wo": (n_layers, dim, dim),
        "rms_ffn": (n_layers, dim),
        "w1": (n_layers, hid, dim),
        "w2": (n_layers, dim, hid),
        "w3": (n_layers, hid, dim),
        "rms_final": (dim,),
        "freq_real": (cfg.seq_len, half_hs),
        "freq_imag": (cfg.seq_len, half_hs),
    }
    if cfg.version == 0:
        order = list(shapes)
    else:
        order = ["rms_att", "rms_ffn", "rms_final", "tok_emb", "wq", "wk", "wv", "wo", "w1", "w2", "w3"]
    if not cfg.shared_classifier:
        shapes["wcls"] = (vocab, dim)
        order.append("wcls")

    expected = sum(math.prod(shapes[name]) for name in order)
    if flat.numel() != expected:
        raise ValueError(f"{path}: header {cfg} implies {expected} floats after the header, file has {flat.numel()}")
    tensors: dict[str, torch.Tensor] = {}
    pos = 0
    for name in order:
        n = math.prod(shapes[name])
        tensors[name] = flat[pos : pos + n].view(shapes[name]).clone()
        pos += n
    theta = 10000.0
    if "freq_real" in tensors:
        theta = _rope_theta_from_freqs(tensors["freq_real"], tensors["freq_imag"], cfg.head_dim)
    return cfg, tensors, theta


def llama2c_to_hf_model(checkpoint_path: str | Path) -> LlamaForCausalLM:
    """Build an fp32 `LlamaForCausalLM` holding the weights of a llama2.c `.bin` checkpoint."""
    path = Path(checkpoint_path)
    cfg, t, theta = _read_weights(path)
    config = LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.dim,
        intermediate_size=cfg.hidden_dim,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.seq_len,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": theta},
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=cfg.shared_classifier,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
    )
    state = {"model.embed_tokens.weight": t["tok_emb"], "model.norm.weight": t["rms_final"]}
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        state[p + "input_layernorm.weight"] = t["rms_att"][i]
        state[p + "self_attn.q_proj.weight"] = _permute_for_hf_rope(t["wq"][i], cfg.n_heads)
        state[p + "self_attn.k_proj.weight"] = _permute_for_hf_rope(t["wk"][i], cfg.n_kv_heads)
        state[p + "self_attn.v_proj.weight"] = t["wv"][i]
        state[p + "self_attn.o_proj.weight"] = t["wo"][i]
        state[p + "post_attention_layernorm.weight"] = t["rms_ffn"][i]
        state[p + "mlp.gate_proj.weight"] = t["w1"][i]
        state[p + "mlp.down_proj.weight"] = t["w2"][i]
        state[p + "mlp.up_proj.weight"] = t["w3"][i]
    state["lm_head.weight"] = t["tok_emb"] if cfg.shared_classifier else t["wcls"]

    model = LlamaForCausalLM(config).float()
    model.load_state_dict(state, strict=True)
    if cfg.shared_classifier:
        model.tie_weights()
    model.eval()
    logger.info(
        "loaded llama2.c v%d checkpoint %s: dim %d, %d layers, %d/%d heads, vocab %d, rope theta %g",
        cfg.version,
        path.name,
        cfg.dim,
        cfg.n_layers,
        cfg.n_heads,
        cfg.n_kv_heads,
        cfg.vocab_size,
        theta,
    )
    return model


def read_llama2c_vocab(tokenizer_path: str | Path, vocab_size: int | None = None) -> tuple[list[bytes], list[float]]:
    """Read a llama2.c `tok*.bin`: token byte strings and merge scores, in id order."""
    raw = Path(tokenizer_path).read_bytes()
    pos = 4  # int32 max_token_length, unused
    pieces: list[bytes] = []
    scores: list[float] = []
    while pos < len(raw) and (vocab_size is None or len(pieces) < vocab_size):
        if pos + 8 > len(raw):
            raise ValueError(f"{tokenizer_path}: truncated after {len(pieces)} tokens (a score and length cut)")
        score, length = struct.unpack_from("<fi", raw, pos)
        pos += 8
        if length < 0 or pos + length > len(raw):
            raise ValueError(f"{tokenizer_path}: truncated in token {len(pieces)} ({length} bytes announced)")
        pieces.append(raw[pos : pos + length])
        scores.append(score)
        pos += length
    if vocab_size is not None and len(pieces) != vocab_size:
        raise ValueError(f"{tokenizer_path}: expected {vocab_size} tokens, found {len(pieces)}")
    return pieces, scores


def llama2c_tokenizer(tokenizer_path: str | Path, vocab_size: int | None = None) -> PreTrainedTokenizerFast:
    """Build an HF fast tokenizer whose encode/decode matches llama2.c run.c for a `tok*.bin` vocabulary.

    Encoding adds `<s>` (like run.c with bos=1) and, like run.c, reads "<s>" written in the text as characters;
    decoding drops the leading space of the first piece (run.c strips it after BOS) and turns `<0xXX>` pieces
    back into bytes.
    """
    pieces, scores = read_llama2c_vocab(tokenizer_path, vocab_size)
    vocab: dict[str, int] = {}
    piece_scores: dict[str, float] = {}
    for i, (piece, score) in enumerate(zip(pieces, scores, strict=True)):
        name = _SPECIAL_NAMES.get(i) or piece.decode("utf-8", errors="replace")
        if name in vocab:
            raise ValueError(f"{tokenizer_path}: duplicate piece {name!r} at ids {vocab[name]} and {i}")
        vocab[name] = i
        if i not in _SPECIAL_NAMES and not (name.startswith("<0x") and len(name) == 6):
            piece_scores[name] = score

    # run.c merges any adjacent pair whose concatenation is a piece, best score first (ties: leftmost).
    merges: list[tuple[float, int, tuple[str, str]]] = []
    for piece, score in piece_scores.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in piece_scores and right in piece_scores:
                merges.append((-score, vocab[piece], (left, right)))
    merges.sort()

    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=[m[2] for m in merges], unk_token="<unk>", byte_fallback=True, fuse_unk=False)
    )
    tok.normalizer = normalizers.Prepend(" ")  # run.c's dummy prefix; no pre-tokenizer: merges cross spaces
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(list(_SPECIAL_NAMES.values()))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B:1", special_tokens=[("<s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
        split_special_tokens=True,
    )


def load_llama2c(
    checkpoint_path: str | Path, tokenizer_path: str | Path
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """Load a llama2.c checkpoint and its tokenizer as an fp32 HF `LlamaForCausalLM` and fast tokenizer."""
    model = llama2c_to_hf_model(checkpoint_path)
    tokenizer = llama2c_tokenizer(tokenizer_path, vocab_size=model.config.vocab_size)
    tokenizer.model_max_length = model.config.max_position_embeddings
    return model, tokenizer


def save_llama2c_as_hf(checkpoint_path: str | Path, tokenizer_path: str | Path, out_dir: str | Path) -> Path:
    """Convert a llama2.c checkpoint + tokenizer and write them as a Hugging Face model folder."""
    out = Path(out_dir)
    model, tokenizer = load_llama2c(checkpoint_path, tokenizer_path)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    logger.info("wrote Hugging Face model to %s", out)
    return out
