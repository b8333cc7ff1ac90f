"""Small random stage transformers shared by the cache and runner tests, and a driver that feeds them through a paged
cache."""
import torch

from vivace.core.block_manager import BlockAllocator
from vivace.core.kv_cache import KVCachePool
from vivace.model.config import TransformerConfig
from vivace.model.transformer import AttentionBatch, CrossBatch, StageTransformer


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


class PagedDriver:
    """Feeds sequences to the model in random-sized pieces through a shared block pool."""

    def __init__(self, model: StageTransformer, block_size: int, num_blocks: int, dtype: torch.dtype = torch.float32) -> None:
        c = model.config
        self.model = model
        self.block_size = block_size
        self.pool = KVCachePool(c.num_layers, num_blocks, block_size, c.num_heads, c.head_dim, dtype, "cpu")
        # a read of an unwritten slot poisons the result (int8 rows: bytes 0xff, whose scale is a NaN)
        self.pool.data.fill_(-1 if dtype == torch.int8 else float("nan"))
        self.allocator = BlockAllocator(num_blocks, block_size)
        self.tables: dict[int, list[int]] = {}
        self.done: dict[int, int] = {}

    def run(self, pieces: list[tuple[int, torch.Tensor, int]], cross: CrossBatch | None) -> torch.Tensor:
        """pieces: (seq id, all its tokens, number of new tokens this step)."""
        rows, positions, slots, starts, lens, tables = [], [], [], [0], [], []
        for seq_id, tokens, n_new in pieces:
            table = self.tables.setdefault(seq_id, [])
            start = self.done.get(seq_id, 0)
            end = start + n_new
            while len(table) * self.block_size < end:
                table.append(self.allocator.allocate())
            for pos in range(start, end):
                rows.append(tokens[pos])
                positions.append(pos)
                slots.append(table[pos // self.block_size] * self.block_size + pos % self.block_size)
            self.done[seq_id] = end
            starts.append(len(rows))
            lens.append(end)
            tables.append(table)
        width = max(len(t) for t in tables)
        batch = AttentionBatch(
            slot_mapping=torch.tensor(slots),
            block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
            context_lens=torch.tensor(lens, dtype=torch.int32),
            query_start_loc=torch.tensor(starts, dtype=torch.int32),
            is_decode=all(n == 1 for _, _, n in pieces),
            cross=cross,
        )
        hidden = self.model(torch.stack(rows), torch.tensor(positions), self.pool.layers(), batch)
        return self.model.compute_logits(hidden)

    def free(self, seq_id: int) -> None:
        self.allocator.release(self.tables.pop(seq_id))
