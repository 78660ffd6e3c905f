"""Tiny causal LMs and locally trained tokenizers, saved like hub models.

No weights can be downloaded here, so tests and the built-in world build their models from a transformers
config and a tokenizer trained on local text, then load them back with `from_pretrained` exactly as a
cluster run loads `mistralai/Mistral-7B-v0.1`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL_TOKENS = {"pad_token": "<pad>", "unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}


def train_tokenizer(
    texts: Iterable[str], out_dir: str | Path | None = None, vocab_size: int = 2000, kind: str = "wordlevel"
) -> PreTrainedTokenizerFast:
    """A word-level (words and punctuation are tokens), byte-level BPE or SentencePiece-style tokenizer trained on
    `texts`.

    Word-level: spaces become a "▁" prefix on the next word (Metaspace) and punctuation is split off, so
    "Hi, you." -> ["▁Hi", ",", "▁you", "."] and decoding restores the text exactly.
    SentencePiece-style ("sentencepiece"): what Llama's and Mistral's tokenizers are, see `sentencepiece_tokenizer`.
    """
    specials = list(SPECIAL_TOKENS.values())
    if kind == "wordlevel":
        tok = Tokenizer(models.WordLevel(unk_token=SPECIAL_TOKENS["unk_token"]))
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Metaspace(prepend_scheme="first"), pre_tokenizers.Punctuation(behavior="isolated")]
        )
        tok.decoder = decoders.Metaspace(prepend_scheme="first")
        trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=specials)
    elif kind == "sentencepiece":
        return _saved(sentencepiece_tokenizer(texts, vocab_size), out_dir)
    elif kind == "bpe":
        tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        )
    else:
        raise ValueError(f"tokenizer kind must be 'wordlevel', 'bpe' or 'sentencepiece', got {kind!r}")
    tok.train_from_iterator(texts, trainer=trainer)
    return _saved(tok, out_dir)


def _saved(tok: Tokenizer, out_dir: str | Path | None) -> PreTrainedTokenizerFast:
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)
    fast.padding_side = "right"
    if out_dir is not None:
        fast.save_pretrained(out_dir)
    return fast


def sentencepiece_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A tokenizer shaped like a SentencePiece Llama / Mistral one converted to `tokenizers`: BPE over "▁"-prefixed
    words (Metaspace, "▁" put in front of the text), byte fallback (a character outside the vocabulary becomes
    its UTF-8 bytes, the 256 tokens <0x00>..<0xFF>), Llama's decoder, and BOS in front of every text.

    Its ids are not a function of the text alone, as with the real ones: a sampled "▁" "the" decodes like "▁the", a
    sampled byte run like the character it encodes, and the text's first space goes in decoding.
    """
    specials = list(SPECIAL_TOKENS.values())
    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.train_from_iterator(texts, trainer=trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials))
    trained = json.loads(tok.to_str())["model"]
    # the byte tokens after the special ones, as in Llama's vocabulary, then what BPE learned
    learned = [t for t, _ in sorted(trained["vocab"].items(), key=lambda item: item[1]) if t not in specials]
    vocab = {t: i for i, t in enumerate(specials + [f"<0x{b:02X}>" for b in range(256)] + learned)}
    merges = [tuple(m) for m in trained["merges"]]
    sp = Tokenizer(models.BPE(vocab, merges, byte_fallback=True, unk_token=SPECIAL_TOKENS["unk_token"]))
    sp.add_special_tokens(specials)
    sp.pre_tokenizer = tok.pre_tokenizer
    sp.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    bos = SPECIAL_TOKENS["bos_token"]
    sp.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                      special_tokens=[(bos, vocab[bos])])
    return sp


def build_tiny_model(
    out_dir: str | Path,
    tokenizer: PreTrainedTokenizerFast,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 2,
    seed: int = 0,
    max_position: int = 512,
) -> Path:
    """A randomly initialised Llama-style model (head_dim >= 32, as vLLM needs) saved with its tokenizer."""
    if hidden_size % num_heads or hidden_size // num_heads < 32:
        raise ValueError(f"hidden_size/num_heads must be a whole head_dim >= 32, got {hidden_size}/{num_heads}")
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 3,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
