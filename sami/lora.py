"""LoRA through peft (`model.lora`): the learner's adapter, the reference it gives for free, what a sync moves, and
adapter folders (PEFT format) that the engines, the evaluation and Serve load as base + adapter.

- The learner wraps the base model with `get_peft_model`: the base is frozen, only the adapter's tensors train,
  and only they are in the optimiser, in a sync and in a checkpoint.
- The reference (SAMI's KL, DPO's reference) is the same model with the adapter switched off (`BaseView`, through
  peft's `disable_adapter()`): the base model's log-probs exactly, with no second copy loaded.
- A sync moves `sync_tensors(module)`: the adapter under its PEFT names (`get_peft_model_state_dict`), the names an
  adapter folder's `adapter_model.safetensors` holds; without LoRA, every parameter.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from sami.config import VLLM_LORA_RANKS, ConfigError, LoraSettings

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def peft_config(settings: LoraSettings, base_model: str | None = None):
    from peft import LoraConfig

    return LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                      target_modules=list(settings.target_modules), task_type="CAUSAL_LM",
                      base_model_name_or_path=base_model)


def missing_targets(model: torch.nn.Module, targets: list[str]) -> list[str]:
    """The target module names that name no module of `model` (peft matches the last part of a dotted name)."""
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    return [t for t in targets if t not in names]


def targets_error(missing: list[str], model: torch.nn.Module, where: str) -> str:
    linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
    return (f"model.lora.target_modules: {missing} name no module of {where}; its linear layers are {linear}")


def with_adapter(model: torch.nn.Module, settings: LoraSettings):
    """`model` wrapped with a fresh adapter (peft initialises B to 0: it computes what the base does); the base's
    parameters are frozen, the adapter's train."""
    from peft import get_peft_model

    missing = missing_targets(model, settings.target_modules)
    if missing:
        raise ConfigError(targets_error(missing, model, getattr(model, "name_or_path", "the model")))
    return get_peft_model(model, peft_config(settings, getattr(model, "name_or_path", None)))


def check_targets(name_or_path: str, settings: LoraSettings, trust_remote_code: bool = False) -> None:
    """Before Ray starts: every target module exists in the model, built from its config on the meta device (no
    weights read). A built-in world model is a Llama; a hub name whose config cannot be read here is left to the
    learner, which refuses the same way (nothing is downloaded here: `--dry-run` stays offline)."""
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

    if not settings.enabled:
        return
    if name_or_path.startswith("builtin:"):
        config = LlamaConfig(num_hidden_layers=1)
    else:
        try:
            config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, local_files_only=True)
        except OSError:
            return
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    missing = missing_targets(skeleton, settings.target_modules)
    if missing:
        raise ConfigError(targets_error(missing, skeleton, name_or_path))


def is_peft(module) -> bool:
    return hasattr(module, "peft_config")


def sync_tensors(module) -> list[tuple[str, torch.Tensor]]:
    """What a weight sync moves: the adapter under its PEFT names, or every parameter without LoRA. The adapter's
    tensors share storage with its parameters, so loading into them (`copy_`) loads the adapter."""
    if is_peft(module):
        from peft import get_peft_model_state_dict

        return list(get_peft_model_state_dict(module).items())
    return list(module.named_parameters())


class AdapterOff:
    """One module of a peft model (its body or head), called with the adapter switched off and in eval mode:
    what the base model computes, bit for bit."""

    def __init__(self, module: torch.nn.Module, peft_model):
        self.module, self.peft_model = module, peft_model

    def __call__(self, *args, **kwargs):
        training = self.module.training
        self.module.eval()
        try:
            with self.peft_model.disable_adapter():
                return self.module(*args, **kwargs)
        finally:
            self.module.train(training)

    def parameters(self):
        return self.module.parameters()


class BaseView:
    """The learner's frozen reference under LoRA: the policy's own modules with its adapter switched off, not a
    second model. It offers what sami/logprobs.py reads from a model: its body, its head, its config."""

    def __init__(self, peft_model):
        self.peft_model = peft_model

    def get_decoder(self):
        return AdapterOff(self.peft_model.get_decoder(), self.peft_model)

    def get_output_embeddings(self):
        return AdapterOff(self.peft_model.get_output_embeddings(), self.peft_model)

    @property
    def config(self):
        return self.peft_model.config

    def parameters(self):
        return self.peft_model.parameters()


def is_adapter_folder(path: str | Path) -> bool:
    return (Path(path).expanduser() / ADAPTER_CONFIG).is_file()


def adapter_base(path: str | Path) -> str:
    """The base model an adapter folder was trained on (`base_model_name_or_path`, as peft writes it)."""
    base = json.loads((Path(path).expanduser() / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if not base:
        raise ConfigError(f"{path}/{ADAPTER_CONFIG} names no base_model_name_or_path: which model is it an adapter of?")
    return base


def adapter_rank(path: str | Path) -> int:
    return int(json.loads((Path(path).expanduser() / ADAPTER_CONFIG).read_text())["r"])


def vllm_max_lora_rank(rank: int) -> int:
    """The smallest `max_lora_rank` vLLM accepts that serves an adapter of `rank`."""
    return next(r for r in VLLM_LORA_RANKS if r >= rank)


def write_adapter_folder(folder: Path, tensors: dict, settings: LoraSettings, base_model: str | None) -> Path:
    """An adapter folder in PEFT format (`adapter_config.json`, `adapter_model.safetensors`): what vLLM loads an
    adapter from (it takes adapters from a folder only). `tensors`: PEFT names -> numpy arrays or tensors."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    peft_config(settings, base_model).save_pretrained(str(folder))
    save_file({name: torch.as_tensor(t).contiguous() for name, t in tensors.items()}, str(folder / ADAPTER_WEIGHTS))
    return folder


def load_adapter_folder(peft_model, folder: str | Path) -> None:
    """An adapter folder's weights into `peft_model`'s adapter (safetensors: nothing unpickled); every tensor must
    be there, with the adapter's shape."""
    from safetensors.torch import load_file

    saved, own = load_file(str(Path(folder) / ADAPTER_WEIGHTS)), dict(sync_tensors(peft_model))
    if saved.keys() != own.keys():
        raise ValueError(f"{folder}: its adapter holds other tensors than this model's (e.g. "
                         f"{sorted(saved.keys() ^ own.keys())[:3]})")
    with torch.no_grad():
        for name, tensor in own.items():
            tensor.copy_(saved[name])
