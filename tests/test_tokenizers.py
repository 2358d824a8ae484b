"""OPT tokenizer rebuilt offline from GPT-2 files, and the in-code byte-level demo tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer, GPT2TokenizerFast, PreTrainedTokenizerFast

from bench.fixtures.opt_tokenizer import build_opt_tokenizer
from pruning.tokenizers import byte_level_tokenizer

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
GPT2_DIR = SHARED_DATA / "gpt2_tokenizer"
WIKITEXT_TEST = SHARED_DATA / "wikitext2" / "wiki.test.raw.joined.txt"

needs_gpt2_files = pytest.mark.skipif(
    not (GPT2_DIR / "fairseq_dict.txt").is_file(), reason=f"shared tokenizer data absent: {GPT2_DIR}"
)

SAMPLE = "Hello world!  The café's 2 naïve\n\nbirds — 418 ☃ 日本\tend "


@pytest.fixture(scope="module")
def opt_tok() -> PreTrainedTokenizerFast:
    if not (GPT2_DIR / "fairseq_dict.txt").is_file():
        pytest.skip(f"shared tokenizer data absent: {GPT2_DIR}")
    return build_opt_tokenizer(GPT2_DIR)


@needs_gpt2_files
def test_opt_known_ids(opt_tok):
    assert opt_tok("Hello world!").input_ids == [2, 31414, 232, 328]
    # ids from transformers' OPT/RoBERTa integration tests, after OPT's leading </s>
    assert opt_tok("Hello world! cécé herlolip").input_ids == [2, 31414, 232, 328, 740, 1140, 12695, 69, 46078, 1588]
    assert (opt_tok.bos_token_id, opt_tok.pad_token_id, opt_tok.eos_token_id, opt_tok.unk_token_id) == (2, 1, 2, 3)
    assert opt_tok.convert_tokens_to_ids(["<s>", "<pad>", "</s>", "<unk>"]) == [0, 1, 2, 3]
    assert opt_tok("Hello world!", add_special_tokens=False).input_ids == [31414, 232, 328]


@needs_gpt2_files
def test_opt_is_gpt2_renumbered_in_fairseq_order(opt_tok):
    """Independent path: GPT-2's own tokenizer, then OPT id = 4 + fairseq line of the GPT-2 id."""
    gpt2 = GPT2TokenizerFast.from_pretrained(GPT2_DIR)
    with open(GPT2_DIR / "fairseq_dict.txt", encoding="utf-8") as f:
        line_of = {int(line.split()[0]): i for i, line in enumerate(f) if line.split()[0].isdigit()}
    gpt2_ids = gpt2(SAMPLE).input_ids
    assert gpt2("Hello world!").input_ids == [15496, 995, 0]
    assert opt_tok(SAMPLE).input_ids == [2] + [4 + line_of[i] for i in gpt2_ids]
    assert opt_tok.decode(opt_tok(SAMPLE).input_ids, skip_special_tokens=True) == SAMPLE


@needs_gpt2_files
@pytest.mark.skipif(not WIKITEXT_TEST.is_file(), reason=f"shared WikiText-2 data absent: {WIKITEXT_TEST}")
def test_opt_wikitext2_token_count(opt_tok):
    text = WIKITEXT_TEST.read_text(encoding="utf-8")
    ids = opt_tok(text, verbose=False).input_ids
    assert len(ids) == 287_644 + 1  # GPT-2 BPE count + OPT's leading </s>
    assert ids[0] == 2 and 2 not in ids[1:]
    assert len(ids) // 2048 == 140  # windows scored by the published protocol at seqlen 2048


@needs_gpt2_files
def test_opt_save_load_roundtrip(opt_tok, tmp_path):
    opt_tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded(SAMPLE).input_ids == opt_tok(SAMPLE).input_ids
    assert loaded.pad_token_id == 1 and loaded.bos_token_id == 2


def test_byte_level_ids_and_roundtrip():
    tok = byte_level_tokenizer()
    assert len(tok) == 260
    assert (tok.bos_token_id, tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (2, 1, 2, 3)
    ids = tok(SAMPLE).input_ids
    assert ids == [2] + [4 + b for b in SAMPLE.encode("utf-8")]
    assert tok.decode(ids, skip_special_tokens=True) == SAMPLE
    assert tok("").input_ids == [2]
    literal = "a<unk>b</s><pad>"  # special-token spellings in the text stay text
    assert tok(literal).input_ids == [2] + [4 + b for b in literal.encode()]


@pytest.mark.parametrize("loader", [AutoTokenizer, PreTrainedTokenizerFast], ids=["auto", "fast"])
def test_byte_level_save_load_roundtrip(tmp_path, loader):
    tok = byte_level_tokenizer()
    tok.save_pretrained(tmp_path)
    loaded = loader.from_pretrained(tmp_path)
    assert len(loaded) == 260
    assert loaded(SAMPLE).input_ids == tok(SAMPLE).input_ids
    assert loaded.decode(loaded(SAMPLE).input_ids, skip_special_tokens=True) == SAMPLE
    specials = (loaded.bos_token, loaded.eos_token, loaded.pad_token, loaded.unk_token)
    assert specials == ("</s>", "</s>", "<pad>", "<unk>")
    batch = loaded(["a", "abc"], padding=True)
    assert batch.input_ids[0] == [2, 4 + ord("a"), 1, 1] or batch.input_ids[0] == [1, 1, 2, 4 + ord("a")]
