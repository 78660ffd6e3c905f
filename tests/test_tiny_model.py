"""Tiny models load like hub models; the word-level tokenizer round-trips text."""
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sami.tiny_model import build_tiny_model, train_tokenizer


def test_wordlevel_tokenizer_splits_punctuation_and_round_trips():
    tok = train_tokenizer(["Hi, you. How are you?", "Response: sure thing!"])
    ids = tok("Hi, you. How are you?", add_special_tokens=False).input_ids
    assert tok.convert_ids_to_tokens(ids)[:4] == ["▁Hi", ",", "▁you", "."]
    assert tok.decode(ids) == "Hi, you. How are you?"
    # a response tokenised on its own continues a prompt seamlessly
    prompt = tok("Response:", add_special_tokens=False).input_ids
    response = tok(" sure thing!", add_special_tokens=False).input_ids
    assert tok.decode(prompt + response) == "Response: sure thing!"
    assert tok.decode(response) == "sure thing!"


def test_bpe_round_trips():
    tok = train_tokenizer(["Hi, you. How are you today?"] * 5, vocab_size=300, kind="bpe")
    assert tok.decode(tok("Hi, you.", add_special_tokens=False).input_ids) == "Hi, you."


def test_saved_model_loads_from_folder_like_a_hub_model(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert model.config.head_dim >= 32 and model.config.vocab_size == len(tok)
    assert tok.eos_token_id == model.config.eos_token_id and tok.pad_token_id is not None
    out = model(torch.tensor([[1, 2, 3]])).logits
    assert out.shape == (1, 3, len(tok))


def test_rejects_small_heads(tmp_path):
    with pytest.raises(ValueError, match="head_dim >= 32"):
        build_tiny_model(tmp_path, train_tokenizer(["a b"]), hidden_size=64, num_heads=4)


def test_sentencepiece_tokenizer_is_shaped_like_llamas():
    tok = train_tokenizer(["Tell me about the river.", "The river is long."] * 5, vocab_size=300, kind="sentencepiece")
    assert tok.convert_ids_to_tokens(tok("the river").input_ids) == ["<s>", "▁the", "▁river"]  # BOS, "▁" prefixes
    assert tok("the river", add_special_tokens=False).input_ids == tok("the river").input_ids[1:]
    assert [f"<0x{b:02X}>" for b in range(256)] == tok.convert_ids_to_tokens(list(range(4, 260)))
    # a character outside the vocabulary goes to its UTF-8 bytes (byte fallback, never <unk>) and decodes back
    ids = tok("river é😀", add_special_tokens=False).input_ids
    assert tok.convert_ids_to_tokens(ids)[-6:] == ["<0xC3>", "<0xA9>", "<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]
    assert tok.decode(ids) == "river é😀" and tok.unk_token_id not in ids
    # ids are not a function of the text: "▁" "t" "he" decodes like "▁the", which the text tokenises to
    pieces = tok.convert_tokens_to_ids(["▁", "t", "he"])
    assert tok.decode(pieces) == "the" and tok("the", add_special_tokens=False).input_ids != pieces
