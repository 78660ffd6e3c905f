"""The world's "pretrained base model": a tiny Llama trained on the world's corpus, cached on disk.

It plays mistral-7b's part in the paper: it knows the format and follows principles weakly (adherence
≈ p_follow). Training is deterministic under a seed on a given machine; the cache key covers every setting and
what else changes the weights (library versions, the CPU threads it trains on: always `PRETRAIN_THREADS`, whatever
the caller's), and a folder counts as cached only once its marker file is written, so a crash never leaves a half
model behind.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from sami.logprobs import collate_sequences, token_logprobs
from sami.objectives import sft_loss
from sami.tiny_model import build_tiny_model, train_tokenizer
from sami.world import grammar, rules

WORLD_VERSION = 3  # bump when the grammar or principles change, to invalidate caches
# Pretraining runs on this many torch threads whatever the caller has (a job driver under `ray job submit` gets 1, a
# test session 2), so neither the weights nor the cache key depend on who builds the model first.
PRETRAIN_THREADS = 2


@dataclass(frozen=True)
class BaseModelSpec:
    num_docs: int = 12000
    steps: int = 1200
    batch_size: int = 48
    lr: float = 3e-3
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 2
    p_follow: float = 0.6
    # Pretraining first on documents that follow their constitution closely teaches the model to read
    # constitutions; the rest of training, at p_follow, calibrates it to follow them only weakly. Like a
    # real base model, it then knows what principles mean without reliably obeying them.
    warmup_p_follow: float = 0.95
    warmup_fraction: float = 0.5
    seed: int = 0

    @classmethod
    def small(cls, seed: int = 0) -> "BaseModelSpec":
        """For CI: a few times cheaper, still well formed and still weakly following."""
        return cls(num_docs=6000, steps=350, seed=seed)


# The names `model.name_or_path` accepts for the world's cached base models.
BUILTIN_MODELS = {"builtin:world": BaseModelSpec(), "builtin:world-small": BaseModelSpec.small()}


def builtin_spec(name: str) -> BaseModelSpec:
    if name not in BUILTIN_MODELS:
        raise ValueError(f"unknown built-in model {name!r}; known: {sorted(BUILTIN_MODELS)}")
    return BUILTIN_MODELS[name]


def resolve_model(name_or_path: str, log=print) -> str:
    """A built-in name becomes the folder of its cached base model (built on first use); others pass through."""
    if name_or_path.startswith("builtin:"):
        return str(ensure_base_model(builtin_spec(name_or_path), log=log))
    return name_or_path


def cache_root() -> Path:
    return Path(os.environ.get("SAMI_CACHE_DIR", Path.home() / ".cache" / "sami-on-ray")) / "world"


def build_environment() -> dict:
    """What else changes the pretrained weights bit for bit: the library versions and the CPU threads (float sums
    split across threads round differently: pretraining pins them, `pretraining_threads`), so a cache carried to
    another machine's libraries is rebuilt, not trusted."""
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "threads": PRETRAIN_THREADS}


@contextmanager
def pretraining_threads():
    """torch on `PRETRAIN_THREADS` threads while the block runs, the caller's count again after."""
    before = torch.get_num_threads()
    torch.set_num_threads(PRETRAIN_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def spec_hash(spec: BaseModelSpec) -> str:
    payload = json.dumps({"world": WORLD_VERSION, **asdict(spec), **build_environment()}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def vocabulary_texts() -> list[str]:
    """Every word the world can write, in both cases, so the word-level tokenizer never needs <unk>."""
    rng = random.Random(0)
    texts = [grammar.corpus_document(rng, 0.5)[0] for _ in range(300)]
    words = set(" ".join(grammar.SUBJECTS + grammar.ADJECTIVES + grammar.THINGS + list(grammar.PLACEHOLDERS)
                         + list(grammar.FILLERS) + list(grammar.QUERY_TEMPLATES)).replace("{a}", "").replace("{b}", "").replace("{s}", "").split())
    words |= {"please,", "thanks,", "kindly,", "is", "with", "the", "and", *rules.COLOURS}
    texts += [" ".join(sorted(words)), " ".join(w[:1].upper() + w[1:] for w in sorted(words))]
    texts += [" ".join(str(n) for n in range(100)) + " . ! , ?"]
    return texts


def pretrain(out_dir: Path, spec: BaseModelSpec, log=print) -> None:
    torch.manual_seed(spec.seed)
    rng = random.Random(spec.seed)
    tokenizer = train_tokenizer(vocabulary_texts(), vocab_size=5000)
    build_tiny_model(out_dir, tokenizer, spec.hidden_size, spec.num_layers, spec.num_heads, seed=spec.seed)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out_dir)
    warmup_docs = int(spec.num_docs * spec.warmup_fraction)
    docs = [grammar.corpus_document(rng, spec.warmup_p_follow if i < warmup_docs else spec.p_follow)
            for i in range(spec.num_docs)]
    prompts = tokenizer([p for p, _ in docs], add_special_tokens=False).input_ids
    responses = [r + [tokenizer.eos_token_id] for r in tokenizer([" " + r for _, r in docs], add_special_tokens=False).input_ids]
    warmup_steps = int(spec.steps * spec.warmup_fraction)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=spec.lr, total_steps=spec.steps, pct_start=0.1)
    model.train()
    start = time.time()
    for step in range(1, spec.steps + 1):
        pool = range(warmup_docs) if step <= warmup_steps else range(warmup_docs, len(docs))
        idx = rng.sample(pool, spec.batch_size)
        batch = collate_sequences([prompts[i] for i in idx], [responses[i] for i in idx], tokenizer.pad_token_id)
        # Only the response is learned: the model must map constitutions to (weak) behaviour.
        loss = sft_loss(token_logprobs(model, batch["input_ids"], batch["attention_mask"]), batch["response_mask"])
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == spec.steps:
            log(f"[world] pretraining base model: step {step}/{spec.steps}, loss {loss.item():.3f}, "
                f"{time.time() - start:.0f}s")
    model.save_pretrained(out_dir)


def ensure_base_model(spec: BaseModelSpec | None = None, cache_dir: str | Path | None = None, log=print) -> Path:
    """The HF folder of the world's base model, pretraining it once per spec (then reused from the cache)."""
    spec = spec or BaseModelSpec()
    folder = Path(cache_dir or cache_root()) / f"base-{spec_hash(spec)}"
    if (folder / "READY").is_file():
        log(f"[world] reusing cached base model {folder}")
        return folder
    tmp = folder.with_name(folder.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    log(f"[world] pretraining the base model ({spec.steps} steps on {spec.num_docs} documents), cached in {folder}")
    with pretraining_threads():
        pretrain(tmp, spec, log)
    (tmp / "spec.json").write_text(json.dumps({**asdict(spec), **build_environment()}, indent=2))
    (tmp / "READY").write_text("ok\n")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder
