"""Text towers: the built-in hashed one and a transformers encoder stored in the pack."""
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

from vivace import Engine
from vivace.families.musiclm.pack import load_pack
from vivace.families.musiclm.random_pack import random_pack

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "slow", "fast", "piano", "drums", "in", "d", "minor", "jazz", "trio"]


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("bert")
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]")
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=len(WORDS), hidden_size=24, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48))
    model.save_pretrained(directory)
    fast.save_pretrained(directory)
    return directory


def test_builtin_tower_is_deterministic_and_prompt_sensitive(tiny_pack: Path) -> None:
    text = load_pack(tiny_pack).text
    a = text.tokens(["slow piano", "fast drums", "slow piano"])
    assert torch.equal(a[0], a[2]) and not torch.equal(a[0], a[1])
    assert torch.equal(text.tokens(["slow piano"])[0], a[0])  # batch-independent


def test_transformers_tower_in_pack(bert_dir: Path, tmp_path: Path) -> None:
    pack_dir = random_pack(tmp_path / "pack", text_model=bert_dir)
    assert (pack_dir / "text" / "config.json").is_file()
    pack = load_pack(pack_dir)
    assert pack.config.text.kind == "transformers"
    prompts = ["slow piano in d minor", "fast jazz trio"]
    model = BertModel.from_pretrained(bert_dir).eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(bert_dir)
    batch = tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    embedding = F.normalize(pack.text.projection(pooled), dim=-1)
    torch.testing.assert_close(pack.text.embed(prompts), embedding, rtol=1e-5, atol=1e-6)
    audio = Engine.from_pack(pack_dir).generate(prompts[0], 0.6, seed=1)
    assert audio.shape == (1, round(0.6 * 24000)) and np.isfinite(audio).all()


def test_transformers_tower_from_an_installed_package(bert_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil
    from dataclasses import replace

    from vivace.errors import PackError
    from vivace.families.musiclm.pack import save_pack

    package = tmp_path / "site" / "fake_text_tower"
    shutil.copytree(bert_dir, package / "model")
    (package / "__init__.py").write_text("")
    in_pack = load_pack(random_pack(tmp_path / "in_pack", text_model=bert_dir))
    config = replace(in_pack.config, text=replace(in_pack.config.text, encoder_package="fake_text_tower"))
    out = save_pack(tmp_path / "by_package", config, in_pack.stages, in_pack.codec, in_pack.text)
    assert not (out / "text").exists()
    with pytest.raises(PackError, match="'fake_text_tower' is not installed"):
        load_pack(out)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    by_package = load_pack(out)
    prompts = ["slow piano in d minor", "fast jazz trio"]
    torch.testing.assert_close(by_package.text.embed(prompts), in_pack.text.embed(prompts), rtol=0, atol=0)
