"""A tokenizer built in code for the offline demo: OPT's four special tokens, then one token per byte.

It follows OPT's conventions (`<s>`=0, `<pad>`=1, `</s>`=2, `<unk>`=3; every encoding starts with `</s>`).
The exact facebook/opt BPE rebuilt from GPT-2's files is a test fixture: ``bench/fixtures/opt_tokenizer.py``.
"""

from __future__ import annotations

import logging

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

# Special tokens shared by OPT and the byte-level demo tokenizer, in id order.
OPT_SPECIAL_TOKENS: tuple[str, ...] = ("<s>", "<pad>", "</s>", "<unk>")
OPT_NUM_SPECIAL = len(OPT_SPECIAL_TOKENS)


def opt_post_processor() -> processors.TemplateProcessing:
    """OPT prepends `</s>` (id 2) to every sequence, like transformers' GPT2Tokenizer(add_bos_token=True)."""
    return processors.TemplateProcessing(
        single="</s> $A",
        pair="</s> $A </s> $B:1",
        special_tokens=[("</s>", 2)],
    )


def wrap_tokenizer(
    tokenizer: Tokenizer, split_special_tokens: bool = False, **special_tokens: str
) -> PreTrainedTokenizerFast:
    """Wrap a `tokenizers.Tokenizer` as a transformers fast tokenizer; decoding never rewrites spaces.

    split_special_tokens=True treats "<unk>", "</s>" written in the text as plain characters.
    """
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        clean_up_tokenization_spaces=False,
        split_special_tokens=split_special_tokens,
        **special_tokens,
    )


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
    tok.post_processor = opt_post_processor()
    return wrap_tokenizer(
        tok, split_special_tokens=True, bos_token="</s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
