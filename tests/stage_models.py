"""Small random stage transformers shared by the cache and runner tests."""
import torch

from vivace.model.config import TransformerConfig
from vivace.model.transformer import StageTransformer


def make_model(position: str, cross: bool = False, seed: int = 0) -> StageTransformer:
    torch.manual_seed(seed)
    config = TransformerConfig(
        num_layers=2, d_model=32, num_heads=4, d_ff=64, vocab_size=40, output_vocab_size=24,
        position=position, max_positions=256, rel_num_buckets=8, rel_max_distance=16,
        num_codebooks=2 if cross else 1, num_output_heads=2 if cross else 1,
        cross_attention=cross, cross_dim=12 if cross else 0, attn_bias=cross, ffn_bias=cross,
        norm="layernorm" if cross else "rmsnorm",
    )
    model = StageTransformer(config).eval()
    model.refresh_derived()
    return model
