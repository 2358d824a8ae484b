"""Perplexity by the published protocol, checked against a hand computation on tiny random models."""

from __future__ import annotations

import builtins
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

from pruning import evaluate
from pruning.evaluate import input_device, perplexity, zero_shot

VOCAB = 97
SEQLEN = 16


def tiny_model(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "llama":
        cfg = LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
        model = LlamaForCausalLM(cfg)
    else:
        cfg = OPTConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            ffn_dim=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
            word_embed_proj_dim=32,
        )
        model = OPTForCausalLM(cfg)
    return model.eval()


@pytest.fixture(scope="module", params=["llama", "opt"])
def model(request):
    return tiny_model(request.param)


def ids_of_length(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


def hand_ppl(model, ids: torch.Tensor, seqlen: int) -> float:
    """exp(mean over every window's next-token NLL), windows disjoint, remainder dropped, float64 log-softmax."""
    nlls = []
    n_windows = ids.shape[1] // seqlen
    for w in range(n_windows):
        window = ids[:, w * seqlen : (w + 1) * seqlen]
        with torch.no_grad():
            logits = model(input_ids=window).logits[0].double()
        logp = torch.log_softmax(logits[:-1], dim=-1)
        nlls.append(-logp[torch.arange(seqlen - 1), window[0, 1:]])
    return math.exp(torch.cat(nlls).mean().item())


def wanda_ppl(model, ids: torch.Tensor, seqlen: int, bs: int) -> float:
    """Wanda's eval_ppl_wikitext arithmetic: mean CE per batch * seqlen * batch, / (nsamples * seqlen)."""
    nsamples = ids.numel() // seqlen
    nlls = []
    for i in range(0, nsamples, bs):
        j = min(i + bs, nsamples)
        inputs = ids[:, i * seqlen : j * seqlen].reshape(j - i, seqlen)
        with torch.no_grad():
            logits = model(input_ids=inputs).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), inputs[:, 1:].reshape(-1))
        nlls.append(loss.float() * seqlen * (j - i))
    return torch.exp(torch.stack(nlls).sum() / (nsamples * seqlen)).item()


@pytest.mark.parametrize("batch_size", [1, 2, 4])
def test_matches_hand_computation(model, batch_size):
    ids = ids_of_length(3 * SEQLEN + 5)  # 3 windows (one partial batch at bs=2) + a remainder of 5
    expected = hand_ppl(model, ids, SEQLEN)
    got = perplexity(model, ids, SEQLEN, batch_size=batch_size, progress=False)
    assert got == pytest.approx(expected, rel=1e-5)
    assert got == pytest.approx(wanda_ppl(model, ids, SEQLEN, batch_size), rel=1e-5)


def test_remainder_is_dropped(model):
    ids = ids_of_length(2 * SEQLEN + SEQLEN - 1)
    exact = perplexity(model, ids[:, : 2 * SEQLEN], SEQLEN, progress=False)
    assert perplexity(model, ids, SEQLEN, progress=False) == exact
    assert perplexity(model, ids[0], SEQLEN, progress=False) == exact  # 1-D ids accepted
    # the remainder is not scored: changing it changes nothing; changing a scored token does
    changed_tail = ids.clone()
    changed_tail[0, -3:] = (changed_tail[0, -3:] + 1) % VOCAB
    assert perplexity(model, changed_tail, SEQLEN, progress=False) == exact
    changed_body = ids.clone()
    changed_body[0, 5] = (changed_body[0, 5] + 1) % VOCAB
    assert perplexity(model, changed_body, SEQLEN, progress=False) != exact


def test_windows_are_independent(model):
    """No context crosses a window boundary: ppl of two windows = exp(mean of the two windows' log-ppl)."""
    ids = ids_of_length(2 * SEQLEN, seed=3)
    first = math.log(perplexity(model, ids[:, :SEQLEN], SEQLEN, progress=False))
    second = math.log(perplexity(model, ids[:, SEQLEN:], SEQLEN, progress=False))
    both = perplexity(model, ids, SEQLEN, batch_size=2, progress=False)
    assert both == pytest.approx(math.exp((first + second) / 2), rel=1e-6)


def test_chunked_nll_matches_unchunked(model, monkeypatch):
    ids = ids_of_length(2 * SEQLEN)
    full = perplexity(model, ids, SEQLEN, progress=False)
    monkeypatch.setattr(evaluate, "_NLL_CHUNK_TOKENS", 4)  # 15 predictions per window -> 4 chunks
    assert perplexity(model, ids, SEQLEN, progress=False) == pytest.approx(full, rel=1e-6)


def test_bad_inputs_and_training_flag_restored():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="need at least seqlen=16"):
        perplexity(model, ids_of_length(SEQLEN - 1), SEQLEN, progress=False)
    with pytest.raises(ValueError, match="shape"):
        perplexity(model, torch.zeros(2, 40, dtype=torch.long), SEQLEN, progress=False)
    model.train()
    perplexity(model, ids_of_length(SEQLEN), SEQLEN, progress=False)
    assert model.training
    assert input_device(model) == torch.device("cpu")


def test_random_model_ppl_is_near_vocab_size():
    """Sanity of scale: a freshly initialised model is close to uniform, so ppl is close to the vocab size."""
    ppl = perplexity(tiny_model("opt"), ids_of_length(4 * SEQLEN), SEQLEN, progress=False)
    assert 0.8 * VOCAB < ppl < 1.25 * VOCAB


def test_zero_shot_without_lm_eval_says_how_to_install(monkeypatch):
    real_import = builtins.__import__

    def no_lm_eval(name, *args, **kwargs):
        if name == "lm_eval" or name.startswith("lm_eval."):
            raise ImportError("No module named 'lm_eval'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_lm_eval)
    with pytest.raises(ImportError, match=r"zero-shot evaluation needs lm-eval: pip install -e '\.\[eval\]'"):
        zero_shot(object(), object(), tasks=("boolq",))


LOCAL_TASK = """task: local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
"""
LOCAL_DOCS = [
    {"question": "The sky is", "choices": ["blue", "green", "loud"], "label": 0},
    {"question": "Fire is", "choices": ["cold", "hot"], "label": 1},
    {"question": "Ice is", "choices": ["cold", "hot"], "label": 0},
    {"question": "A cat says", "choices": ["meow", "moo"], "label": 0},
    {"question": "Two plus two is", "choices": ["four", "five"], "label": 0},
]


def test_zero_shot_scores_the_in_memory_model_like_an_independent_loglikelihood(tmp_path, monkeypatch):
    """lm-eval's HFLM wraps our in-memory model: its multiple-choice accuracy on a local task equals an
    accuracy computed here from the model's own log-likelihoods of ' ' + choice after the question."""
    pytest.importorskip("lm_eval", reason="lm-eval is the optional extra .[eval]")
    import json

    from transformers import OPTConfig, OPTForCausalLM

    from pruning.evaluate import zero_shot
    from pruning.tokenizers import byte_level_tokenizer

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    data = tmp_path / "docs.jsonl"
    data.write_text("\n".join(json.dumps(d) for d in LOCAL_DOCS))
    (tmp_path / "local_mc.yaml").write_text(LOCAL_TASK.format(data=data))
    torch.manual_seed(3)
    config = OPTConfig(vocab_size=260, hidden_size=32, word_embed_proj_dim=32, ffn_dim=64, num_hidden_layers=2,
                       num_attention_heads=2, max_position_embeddings=128)  # fmt: skip
    model, tokenizer = OPTForCausalLM(config).eval(), byte_level_tokenizer()

    def loglikelihood(context: str, continuation: str) -> float:
        ctx = tokenizer(context).input_ids  # leading </s>, then one id per byte
        cont = tokenizer(continuation, add_special_tokens=False).input_ids
        ids = torch.tensor([ctx + cont])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
        return sum(float(logprobs[len(ctx) - 1 + i, tok]) for i, tok in enumerate(cont))

    correct = [
        max(range(len(d["choices"])), key=lambda c, d=d: loglikelihood(d["question"], " " + d["choices"][c]))
        == d["label"]
        for d in LOCAL_DOCS
    ]
    import lm_eval

    captured = {}
    simple_evaluate = lm_eval.simple_evaluate

    def keep_samples(**kwargs):  # the same call, with per-document log-likelihoods kept for the check below
        captured.update(simple_evaluate(**kwargs, log_samples=True))
        return captured

    monkeypatch.setattr(lm_eval, "simple_evaluate", keep_samples)
    results = zero_shot(model, tokenizer, ["local_mc"], include_path=str(tmp_path))
    assert results["local_mc"]["acc,none"] == pytest.approx(sum(correct) / len(correct))
    assert "local_mc" in results.table and "acc" in results.table  # lm-eval's own table
    assert results.meta["n_shot"] == {"local_mc": 0} and results.meta["lm_eval_version"]
    samples = sorted(captured["samples"]["local_mc"], key=lambda s: s["doc_id"])
    for doc, sample in zip(LOCAL_DOCS, samples, strict=True):
        got = [float(resp[0]) for resp in sample["filtered_resps"]]
        want = [loglikelihood(doc["question"], " " + choice) for choice in doc["choices"]]
        assert got == pytest.approx(want, rel=1e-4, abs=1e-4)  # fp32 model, fp64 log-softmax here


@pytest.mark.parametrize("kind", ["opt", "llama"])
def test_streamed_layers_hold_device_copies_only_during_their_own_forward(kind):
    """--offload's whole-model forwards (zero-shot): each decoder layer computes with copies of its weights made
    for its forward (here 'copies' on the CPU; on a GPU, the transfers), every other layer holds its CPU
    tensors meanwhile, the logits are unchanged, and afterwards the model points at its CPU tensors again."""
    from pruning.adapters import get_adapter
    from pruning.placement import layers_streamed_through

    model = tiny_model(kind).eval()
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    ids = torch.randint(0, VOCAB, (2, SEQLEN), generator=torch.Generator().manual_seed(0))

    def storage(module):
        return [t.data_ptr() for t in [*module.parameters(), *module.buffers()]]

    before = [storage(layer) for layer in layers]
    with torch.no_grad():
        want = model(ids).logits
    seen = []

    def record(index):
        def hook(_layer, _args):
            now = [storage(layer) for layer in layers]
            seen.append([i for i in range(len(layers)) if all(a != b for a, b in zip(now[i], before[i], strict=True))])
            assert all(now[i] == before[i] for i in range(len(layers)) if i != index)

        return hook

    with layers_streamed_through(model, adapter, torch.device("cpu")), torch.no_grad():
        handles = [layer.register_forward_pre_hook(record(i)) for i, layer in enumerate(layers)]
        got = model(ids).logits
        for handle in handles:
            handle.remove()
    assert seen == [[0], [1]]  # each layer on its copies during its own forward, and only then
    assert torch.equal(got, want)
    assert [storage(layer) for layer in layers] == before
    assert all(not layer._forward_pre_hooks and not layer._forward_hooks for layer in layers)


def test_cli_zero_shot_of_a_model_in_cpu_ram_streams_its_layers(monkeypatch):
    """With --offload on a GPU machine, lm-eval runs the model with its layers streamed (simulated here: the
    model in CPU RAM, 'the GPU' being the CPU), and gets --eval_batch_size requests per forward."""
    import argparse

    from pruning.adapters import get_adapter
    from pruning.cli import prune

    model = tiny_model("opt").eval()
    layers = get_adapter(model).layers(model)
    calls = []

    def fake_zero_shot(model_, tokenizer, tasks, batch_size, include_path):
        calls.append((tasks, batch_size, [bool(layer._forward_pre_hooks) for layer in layers]))
        return {"boolq": {"acc,none": 0.5}}

    monkeypatch.setattr(evaluate, "zero_shot", fake_zero_shot)
    monkeypatch.setattr(evaluate, "streamed_from_cpu", lambda *_: True)
    monkeypatch.setattr(evaluate, "compute_device_for", lambda _module: torch.device("cpu"))
    args = argparse.Namespace(zero_shot_tasks="boolq,rte", eval_batch_size=8, zero_shot_include_path=None)
    assert prune.evaluate_zero_shot(model, None, args) == {"boolq": {"acc,none": 0.5}}
    assert calls == [(["boolq", "rte"], 8, [True, True])]
    assert not any(layer._forward_pre_hooks for layer in layers)


def test_layerwise_perplexity_refuses_what_perplexity_refuses():
    from pruning.adapters import get_adapter
    from pruning.evaluate import layerwise_perplexity

    model = tiny_model("opt").eval()
    with pytest.raises(ValueError, match="seqlen must be >= 2"):
        layerwise_perplexity(model, get_adapter(model), torch.zeros(1, 64, dtype=torch.long), 1)
    with pytest.raises(ValueError, match="ids must have shape"):
        layerwise_perplexity(model, get_adapter(model), torch.zeros(2, 64, dtype=torch.long), 16)
