"""Small random EnCodec decoders shared by the ONNX and chunked-decode tests."""
import dataclasses

import torch

from vivace.codecs.encodec import EncodecConfig, EncodecDecoder

CONFIGS = {
    "musicgen_32khz": dataclasses.replace(EncodecConfig.musicgen_32khz(), num_filters=4, codebook_dim=16),
    "causal_24khz": dataclasses.replace(EncodecConfig(), num_levels=8, num_filters=4, codebook_dim=16, codebook_size=32),
}


def random_decoder(config: EncodecConfig, seed: int) -> EncodecDecoder:
    torch.manual_seed(seed)
    decoder = EncodecDecoder(config).eval()
    with torch.no_grad():
        decoder.codebooks.normal_()
    return decoder
