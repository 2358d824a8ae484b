"""Tokenizers built offline: the exact facebook/opt BPE and a tiny byte-level tokenizer for demos.

OPT reuses GPT-2's byte-level BPE but renumbers the tokens in fairseq dictionary order:
`<s>`=0, `<pad>`=1, `</s>`=2, `<unk>`=3, and the GPT-2 id written on line i (0-based) of fairseq's
`dict.txt` becomes OPT id 4 + i. Every OPT encoding starts with `</s>` (id 2), e.g.
"Hello world!" -> [2, 31414, 232, 328].
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

# Special tokens shared by OPT and the byte-level demo tokenizer, in id order.
OPT_SPECIAL_TOKENS: tuple[str, ...] = ("<s>", "<pad>", "</s>", "<unk>")
OPT_NUM_SPECIAL = len(OPT_SPECIAL_TOKENS)


def _opt_post_processor() -> processors.TemplateProcessing:
    """OPT prepends `</s>` (id 2) to every sequence, like transformers' GPT2Tokenizer(add_bos_token=True)."""
    return processors.TemplateProcessing(
        single="</s> $A",
        pair="</s> $A </s> $B:1",
        special_tokens=[("</s>", 2)],
    )


def _wrap(tokenizer: Tokenizer, split_special_tokens: bool = False, **special_tokens: str) -> PreTrainedTokenizerFast:
    """Wrap a `tokenizers.Tokenizer` as a transformers fast tokenizer; decoding never rewrites spaces.

    split_special_tokens=True treats "<unk>", "</s>" written in the text as plain characters.
    """
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        clean_up_tokenization_spaces=False,
        split_special_tokens=split_special_tokens,
        **special_tokens,
    )


def _read_fairseq_order(dict_path: Path, n_tokens: int) -> list[int]:
    """GPT-2 ids in fairseq dictionary order (first `n_tokens` lines of dict.txt)."""
    order: list[int] = []
    with open(dict_path, encoding="utf-8") as f:
        for line_no, line in enumerate(f):
            if len(order) == n_tokens:
                break
            symbol = line.split(" ", 1)[0]
            if not symbol.isdigit():
                raise ValueError(f"{dict_path}:{line_no + 1}: expected a GPT-2 token id, got {symbol!r}")
            order.append(int(symbol))
    if sorted(order) != list(range(n_tokens)):
        raise ValueError(f"{dict_path}: the first {n_tokens} lines are not a permutation of the GPT-2 ids")
    return order


def build_opt_tokenizer(gpt2_dir: str | Path) -> PreTrainedTokenizerFast:
    """Rebuild the facebook/opt tokenizer from GPT-2 `vocab.json`, `merges.txt` and fairseq `fairseq_dict.txt`.

    The BPE merges are GPT-2's; only the ids change (OPT id = 4 + fairseq line index of the GPT-2 id).
    """
    gpt2_dir = Path(gpt2_dir)
    paths = {name: gpt2_dir / name for name in ("vocab.json", "merges.txt", "fairseq_dict.txt")}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"OPT tokenizer files missing: {', '.join(missing)}")

    with open(paths["vocab.json"], encoding="utf-8") as f:
        gpt2_vocab: dict[str, int] = json.load(f)
    gpt2_tokens = {gpt2_id: token for token, gpt2_id in gpt2_vocab.items()}
    order = _read_fairseq_order(paths["fairseq_dict.txt"], len(gpt2_vocab))

    opt_vocab = {token: i for i, token in enumerate(OPT_SPECIAL_TOKENS)}
    for line_index, gpt2_id in enumerate(order):
        opt_vocab[gpt2_tokens[gpt2_id]] = OPT_NUM_SPECIAL + line_index

    with open(paths["merges.txt"], encoding="utf-8") as f:
        merges = [tuple(line.split(" ")) for line in f.read().split("\n") if line and not line.startswith("#version")]

    tok = Tokenizer(models.BPE(vocab=opt_vocab, merges=merges, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(OPT_SPECIAL_TOKENS))
    tok.post_processor = _opt_post_processor()
    logger.debug("built OPT tokenizer: %d tokens, %d merges", len(opt_vocab), len(merges))
    # facebook/opt's tokenizer_config uses </s> as BOS (and EOS); <pad> is id 1.
    return _wrap(tok, bos_token="</s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character map (what the ByteLevel pre-tokenizer emits)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """A 260-token tokenizer built in code: `<s>`,`<pad>`,`</s>`,`<unk>` then one token per byte (id 4 + byte).

    It follows OPT's conventions (prepends `</s>`), so it pairs with a tiny random OPT in no-network demos.
    Any text round-trips exactly through encode/decode, special-token spellings in the text included.
    """
    vocab = {token: i for i, token in enumerate(OPT_SPECIAL_TOKENS)}
    for byte, char in _bytes_to_unicode().items():
        vocab[char] = OPT_NUM_SPECIAL + byte
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    # use_regex=False: no word splitting is needed when every byte is its own token.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(OPT_SPECIAL_TOKENS))
    tok.post_processor = _opt_post_processor()
    return _wrap(
        tok, split_special_tokens=True, bos_token="</s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
