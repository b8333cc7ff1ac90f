"""Small random EnCodec models shared by the codec tests: vivace decoders, and transformers EncodecModels of
every configuration branch."""
import dataclasses

import torch
from transformers import EncodecConfig as TransformersEncodecConfig
from transformers import EncodecModel

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

TINY = {
    # facebook/encodec_24khz's shape (causal, reflect padding, conv shortcuts), narrow and with small codebooks
    "causal_24khz": dict(num_filters=4, hidden_size=16, codebook_size=32, target_bandwidths=[1.5, 3.0]),
    # facebook/encodec_32khz (MusicGen): non-causal, no conv shortcut, 4 codebooks x 2048
    "musicgen_32khz": dict(
        num_filters=4, hidden_size=16, codebook_size=2048, upsampling_ratios=[8, 5, 4, 4], target_bandwidths=[2.2],
        sampling_rate=32000, use_causal_conv=False, use_conv_shortcut=False,
    ),
    # the other branches: time group norm, zero padding, a partial right trim, odd ratio, two residual layers
    "group_norm": dict(
        num_filters=8, hidden_size=8, codebook_size=16, upsampling_ratios=[3, 2], target_bandwidths=[1.2],
        sampling_rate=600, norm_type="time_group_norm", pad_mode="constant", trim_right_ratio=0.5,
        num_residual_layers=2, num_lstm_layers=1, kernel_size=5, last_kernel_size=3, residual_kernel_size=5, compress=4,
    ),
    # non-causal with even kernels: the odd padding sample goes left; replicate padding
    "even_kernels": dict(
        num_filters=6, hidden_size=8, codebook_size=16, upsampling_ratios=[3, 4], target_bandwidths=[1.2],
        sampling_rate=1200, use_causal_conv=False, pad_mode="replicate", kernel_size=4, last_kernel_size=6,
        residual_kernel_size=2, dilation_growth_rate=3, num_residual_layers=2, num_lstm_layers=1,
    ),
}


def random_transformers_model(kwargs: dict[str, object], seed: int) -> EncodecModel:
    torch.manual_seed(seed)
    model = EncodecModel(TransformersEncodecConfig(**kwargs)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("original0"):  # weight-norm gains away from |v|, so folding them is exercised
                param.mul_(torch.empty_like(param).uniform_(0.5, 1.5))
            elif ".norm." in name:
                param.normal_(0.5, 0.3)
        for level in model.quantizer.layers:
            level.codebook.embed.normal_()
    return model
