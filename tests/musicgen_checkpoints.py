"""Small random transformers MusicGen checkpoints (config, weights, tokenizer) for the MusicGen tests; no download."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

WORDS = "a the slow fast piano drums jazz rock ambient pads with and in of bass guitar strings choir loud soft".split()


@dataclass(frozen=True)
class TinyMusicGen:
    codebook_size: int = 64
    num_codebooks: int = 4
    hidden: int = 48
    layers: int = 2
    heads: int = 4
    ffn: int = 96
    text_hidden: int = 32  # != hidden: enc_to_dec_proj
    cross_hidden: int | None = None  # transformers' cross_attention_hidden_size
    sampling_rate: int = 3200
    ratios: tuple[int, ...] = (4, 4)
    seed: int = 0


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(["<pad>", "</s>", "<unk>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def build_model(spec: TinyMusicGen):
    from transformers import EncodecConfig, MusicgenConfig, MusicgenDecoderConfig, MusicgenForConditionalGeneration, T5Config

    torch.manual_seed(spec.seed)
    hop = math.prod(spec.ratios)
    frame_rate = math.ceil(spec.sampling_rate / hop)
    bits = math.ceil(math.log2(spec.codebook_size))
    text = T5Config(
        vocab_size=len(WORDS) + 3, d_model=spec.text_hidden, d_kv=8, d_ff=2 * spec.text_hidden, num_layers=2,
        num_heads=spec.text_hidden // 8, relative_attention_num_buckets=8,
    )
    audio = EncodecConfig(
        codebook_size=spec.codebook_size, num_filters=4, upsampling_ratios=list(spec.ratios), sampling_rate=spec.sampling_rate,
        target_bandwidths=[(spec.num_codebooks * frame_rate * bits + 0.5) / 1000], use_causal_conv=False, hidden_size=16,
        codebook_dim=16, num_lstm_layers=1,
    )
    pad = spec.codebook_size
    decoder = MusicgenDecoderConfig(
        vocab_size=spec.codebook_size, hidden_size=spec.hidden, num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
        ffn_dim=spec.ffn, num_codebooks=spec.num_codebooks, pad_token_id=pad, bos_token_id=pad, decoder_start_token_id=pad,
        max_position_embeddings=256, cross_attention_hidden_size=spec.cross_hidden,
    )
    model = MusicgenForConditionalGeneration(MusicgenConfig(text_encoder=text, audio_encoder=audio, decoder=decoder)).eval()
    with torch.no_grad():
        # unit-gain projections instead of the 0.02 init: the text condition must visibly move the logits, and
        # larger logits keep greedy choices away from near-ties
        linears = [m for m in model.decoder.modules() if isinstance(m, torch.nn.Linear)]
        for linear in linears + ([model.enc_to_dec_proj] if hasattr(model, "enc_to_dec_proj") else []):
            linear.weight.normal_(0, linear.in_features**-0.5)
        for head in model.decoder.lm_heads:
            head.weight.normal_(0, 0.5)
        for level in model.audio_encoder.quantizer.layers:  # transformers leaves the codebooks at zero
            level.codebook.embed.normal_()
    return model


def write_checkpoint(path: Path, spec: TinyMusicGen = TinyMusicGen()) -> Path:
    model = build_model(spec)
    model.save_pretrained(path)
    tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: a second intra-op thread only adds barrier waits, which cost seconds per call when
    the machine's cores are shared with other work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
