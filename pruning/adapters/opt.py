"""Facebook OPT (facebook/opt-125m ... opt-66b): layers at model.model.decoder.layers."""

from pruning.adapters.base import DecoderAdapter

OPT = DecoderAdapter(
    family="OPT",
    model_types=("opt",),
    layers_path="model.decoder.layers",
    embedding_paths=("model.decoder.embed_tokens", "model.decoder.embed_positions", "model.decoder.project_in"),
    head_paths=("model.decoder.final_layer_norm", "model.decoder.project_out", "lm_head"),
    linear_groups=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.out_proj",),
        ("fc1",),
        ("fc2",),
    ),
)
