"""MusicGen's text condition: prompt -> tokenizer -> transformers text encoder (T5) -> optional projection.

The encoder and tokenizer live in the pack's text/ folder as save_pretrained wrote them and run with
transformers. Each prompt is encoded on its own (no padding), so a row's condition does not depend on the batch.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from vivace.errors import PackError


class MusicGenText(nn.Module):
    def __init__(self, directory: Path, projection: nn.Linear | None) -> None:
        super().__init__()
        from transformers import AutoModelForTextEncoding, AutoTokenizer
        from transformers.utils import logging

        bars = logging.is_progress_bar_enabled()
        logging.disable_progress_bar()  # a weight-loading bar on stderr would break the CLI's one-line errors
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
            self.encoder = AutoModelForTextEncoding.from_pretrained(directory, local_files_only=True).eval()
        except (OSError, ValueError) as exc:
            raise PackError(f"{directory}: the text encoder or tokenizer does not load ({exc})") from None
        finally:
            if bars:
                logging.enable_progress_bar()
        self.projection = projection

    def num_tokens(self, prompt: str) -> int:
        return len(self.tokenizer([prompt])["input_ids"][0])

    @torch.inference_mode()
    def encode(self, prompt: str) -> tuple[torch.Tensor, list[int]]:
        """Encoder states [tokens, cross_dim] in float32, as transformers' MusicGen feeds its cross-attention,
        and the prompt's token ids."""
        batch = self.tokenizer([prompt], return_tensors="pt")
        device = next(self.encoder.parameters()).device
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        states = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        if self.projection is not None:
            states = self.projection(states)
        return states[0].float(), ids[0].tolist()
