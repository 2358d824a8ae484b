"""wanda-prune check MODEL: what to run before a long job.

Loads the model and tokenizer, shows the architecture, the decoder-layer path and the Linear shapes,
generates a few tokens, and validates the weights (dtype, no NaN/inf, how many exact zeros already). A checkpoint
saved by wanda-prune is first compared with the checksums recorded at save time.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


def run_check(argv: list[str]) -> int:
    from pruning.adapters import get_adapter
    from pruning.cli.parser import ArgumentParser, HelpFormatter, add_dashed_aliases
    from pruning.loading import load_config, load_model, load_tokenizer

    parser = ArgumentParser(
        prog="wanda-prune check", description=__doc__.split("\n\n", 1)[1].strip(), formatter_class=HelpFormatter,
        epilog="examples:\n  wanda-prune check facebook/opt-1.3b\n  wanda-prune check pruned/opt-6.7b-24   "
        "# a saved model: checksums, sparsity, the N:M pattern\n\nexit status: 0 ready, 1 a problem found, 2 bad input",
    )  # fmt: skip
    parser.add_argument("model", help="HF model id, local directory (a saved pruned model too) or .gguf file")
    parser.add_argument("--cache_dir", default="llm_weights", help="Hugging Face cache directory")
    parser.add_argument("--dtype", choices=["auto", "float16", "bfloat16", "float32"], default="auto",
                        help="weights dtype to load")  # fmt: skip
    parser.add_argument("--prompt", default="The capital of France is", help="text to continue in the generation test")
    parser.add_argument("--max_new_tokens", type=int, default=16, help="tokens to generate")
    add_dashed_aliases(parser)
    args = parser.parse_args(argv)
    if args.max_new_tokens <= 0:
        raise ValueError(f"--max_new_tokens must be positive, got {args.max_new_tokens}")

    config = load_config(args.model, args.cache_dir)
    adapter = get_adapter(config.model_type)
    print(f"model        {args.model}")
    print(f"architecture {config.model_type} ({adapter.family} adapter), decoder layers: {adapter.layers_path}")
    damage = _verify_checksums(Path(args.model).expanduser())
    if damage:
        for problem in damage:
            print(f"PROBLEM      {problem}")
        return 1
    tokenizer = load_tokenizer(args.model, args.cache_dir)
    model = load_model(args.model, args.cache_dir, args.dtype)  # on the GPU when it fits, as the run will be
    layers = adapter.layers(model)
    print(f"layers       {len(layers)} decoder layers; Linear shapes [out x in] of layer 0:")
    for name, module in layers[0].named_modules():
        if isinstance(module, nn.Linear):
            print(f"  {name:20s} {module.out_features} x {module.in_features}")
    groups = adapter.groups_for(layers[0])
    print(f"groups       {' | '.join('/'.join(n.split('.')[-1] for n in g) for g in groups)} (shared inputs)")

    problems = []
    n_params = zeros = 0
    dtypes = set()
    for name, p in model.named_parameters():
        dtypes.add(str(p.dtype).removeprefix("torch."))
        n_params += p.numel()
        zeros += int((p == 0).sum())
        if not torch.isfinite(p).all():
            problems.append(f"{name} has NaN/inf values")
    print(f"weights      {n_params / 1e6:.1f}M parameters, dtype {', '.join(sorted(dtypes))}")
    print(f"sparsity     {_decoder_sparsity_line(layers)}")

    device = next(model.parameters()).device
    inputs = tokenizer(args.prompt, return_tensors="pt").to(device)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    print(f"generation   {tokenizer.decode(out[0], skip_special_tokens=True)!r}")
    if problems:
        for problem in problems:
            print(f"PROBLEM      {problem}")
        return 1
    print("ok           ready to prune")
    return 0


def _decoder_sparsity_line(layers) -> str:
    """Exact zeros over the decoder layers' Linears (what pruning prunes; the embeddings would dominate a count over
    every parameter), and the N:M pattern every such weight holds, if any (1:2, 2:4, 4:8 tried, in input order)."""
    dense = []
    for layer in layers:
        for module in layer.modules():
            if isinstance(module, nn.Linear):
                dense.append(module.weight.detach())
            elif hasattr(module, "to_dense"):  # Sparse24Linear, as load_sparse gives it
                dense.append(module.to_dense())
    total = sum(w.numel() for w in dense)
    zeros = sum(int((w == 0).sum()) for w in dense)
    patterns = []
    for n, m in ((1, 2), (2, 4), (4, 8)):
        if all(w.shape[1] % m == 0 and bool(((w.reshape(-1, m) == 0).sum(dim=1) >= m - n).all()) for w in dense):
            patterns.append(f"{n}:{m}")
    pattern = f"N:M held by every one: {', '.join(patterns)}" if patterns else "no N:M pattern (1:2, 2:4, 4:8) held"
    return f"{zeros / max(total, 1):.2%} exact zeros in the {len(dense)} decoder-layer Linears; {pattern}"


def _verify_checksums(directory: Path) -> list[str]:
    """Compare a local checkpoint with the checksums recorded when it was saved; print what was found."""
    from pruning import checksums

    if not directory.is_dir():
        return []  # a hub id: the hub's own hashes guard the download
    result = checksums.verify(directory)
    if not result.recorded:
        print(f"integrity    not verified: no {checksums.MANIFEST} (not saved by wanda-prune)")
    elif not result.problems:
        rate = result.bytes / 2**20 / max(result.seconds, 1e-9)
        print(f"integrity    ok: {result.files} files, {result.bytes / 2**20:.1f} MiB hashed at {rate:.0f} MiB/s")
    return [f"integrity: {problem}" for problem in result.problems]
