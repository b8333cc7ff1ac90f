"""EnCodec decoders (LSTM included) exported to ONNX match torch through onnxruntime at other batches and lengths."""
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from encodec_models import CONFIGS, random_decoder
from vivace.export.onnx_codec import OPSET, export_codec, min_frames

TOL = 1e-4


@pytest.mark.parametrize("name", list(CONFIGS))
def test_export_matches_torch(name: str, tmp_path: Path) -> None:
    config = CONFIGS[name]
    decoder = random_decoder(config, 1)
    path = tmp_path / "encodec.onnx"
    assert export_codec(decoder, path) <= TOL
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    assert model.opset_import[0].version == OPSET and any(node.op_type == "LSTM" for node in model.graph.node)
    shortest = min_frames(decoder)
    assert shortest == (7 if config.causal else 4)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(2)
    for batch, frames in [(1, shortest), (2, 9), (3, 57), (1, 160)]:
        codes = torch.randint(0, config.codebook_size, (batch, config.num_levels, frames), generator=generator)
        (pcm,) = session.run(None, {"codes": codes.numpy()})
        with torch.inference_mode():
            expected = decoder(codes).numpy()
        assert pcm.shape == (batch, frames * config.hop_length) and pcm.dtype == np.float32
        assert np.abs(expected).max() > 0.01
        assert np.abs(pcm - expected).max() <= TOL
    short = np.zeros((1, config.num_levels, shortest - 1), dtype=np.int64)
    with pytest.raises(Exception, match="Pad reflect"):
        session.run(None, {"codes": short})
