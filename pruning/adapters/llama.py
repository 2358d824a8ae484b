"""The LLaMA family (Llama 1/2/3, Mistral, Qwen2/3): layers at model.model.layers, rotary embeddings
computed once by model.model.rotary_emb and passed to every layer as ``position_embeddings``."""

from pruning.adapters.base import DecoderAdapter

LLAMA = DecoderAdapter(
    family="LLaMA",
    model_types=("llama", "mistral", "qwen2", "qwen3"),
    layers_path="model.layers",
    embedding_paths=("model.embed_tokens", "model.rotary_emb"),
    head_paths=("model.norm", "lm_head"),
    linear_groups=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    ),
)
