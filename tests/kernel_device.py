"""Where the kernel tests run: the Triton CPU interpreter on small shapes (the default, as in CI), or a CUDA GPU,
with the full shapes added, when VIVACE_TEST_DEVICE=cuda:

    VIVACE_TEST_DEVICE=cuda python -m pytest tests/test_triton_attention.py tests/test_triton_fused.py \
        tests/test_triton_sampling.py

Import this module before anything imports triton: on the CPU it selects the interpreter."""
import os

import torch

ON_GPU = os.environ.get("VIVACE_TEST_DEVICE") == "cuda"
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"
DEVICE = torch.device("cuda" if ON_GPU else "cpu")


def full_shapes(small: list, full: list) -> list:
    """The small cases everywhere, the full ones too on a GPU."""
    return small + full if ON_GPU else small


def relative_error(out: torch.Tensor, expected: torch.Tensor) -> float:
    """max |out - expected| / max |expected|, in float32."""
    return ((out.float() - expected.float()).abs().max() / expected.float().abs().max()).item()
