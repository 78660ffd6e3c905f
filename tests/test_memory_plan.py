"""The memory plan per GPU (sami/memory_plan.py, pipelines/memory.py): parameters counted from a config alone against
models instantiated from it, every figure against a hand computation for two published shapes, a plan that cannot
fit refused in one line, and every training preset's --dry-run printing its plan."""
import json
from pathlib import Path

import pytest
import transformers

from pipelines.memory import role_gpu
from pipelines.train import main as train_main
from sami.config import ConfigError, load_config
from sami.memory_plan import (PARTITIONED, SHAPES_DIR, TODAY, Gpu, ModelShape, count_parameters, learner_memory,
                              memory_plan, model_config)

REPO = Path(__file__).resolve().parents[1]
A100, L40S = Gpu("A100 80 GB", 80, "test"), Gpu("L40S 48 GB", 48, "test")


def preset(name: str, *overrides: str):
    return load_config(REPO / "configs" / f"{name}.yaml", list(overrides))


@pytest.mark.parametrize("config", [
    transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=8,
                             num_key_value_heads=2, vocab_size=101, tie_word_embeddings=False),
    transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                             head_dim=24, vocab_size=101, attention_bias=True, mlp_bias=True, tie_word_embeddings=True),
    transformers.MixtralConfig(hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=8,
                               num_key_value_heads=4, num_local_experts=4, num_experts_per_tok=2, vocab_size=97),
    transformers.Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=101, tie_word_embeddings=True),
], ids=["llama-gqa", "llama-bias-head-dim-tied", "mixtral", "qwen2"])
def test_parameters_counted_from_the_config_match_the_instantiated_model(config):
    model = transformers.AutoModelForCausalLM.from_config(config)
    assert count_parameters(config) == sum(p.numel() for p in model.parameters())
    assert count_parameters(config.to_dict()) == count_parameters(config)


def test_published_shapes_count_their_published_parameters():
    counts = {p.stem: count_parameters(json.loads(p.read_text())) for p in SHAPES_DIR.glob("*.json")}
    assert counts == {"mistral-7b": 7_241_732_096, "mixtral-8x7b": 46_702_792_704, "llama-3-70b": 70_553_706_496,
                      "llama-2-7b": 6_738_415_616}


def test_learner_figures_against_a_hand_computation_mistral_7b_zero2():
    """hh_mistral7b at ZeRO-2: 8 learners, RMSprop (1 state), bf16 with an fp32 master copy, init: base (a full
    reference copy today), C = 2, prompts of 1024 and responses of 350 tokens + EOS, one group a micro-batch."""
    h, layers, vocab, kv, inter = 4096, 32, 32000, 8 * 128, 14336
    psi = layers * (2 * h * h + 2 * h * kv + 3 * h * inter + 2 * h) + 2 * vocab * h + h
    assert psi == 7_241_732_096
    tokens = 1 * 2 * (1024 + 2 * 351)  # packed: each prompt once, its 2 responses behind it
    assert tokens == 3452
    per_layer = 2 * (3 * h + 2 * kv + h + 4 * inter) + 2 * (4 * h + 2 * h)  # bf16 tensors + two norms
    per_token = layers * per_layer + (4 * h + 2 * h)  # + the final norm
    assert per_token == 6_447_104
    hand = {
        "weights": 2 * psi,  # 14,483,464,192: whole under ZeRO-2
        "gradients": 2 * psi / 8,  # 1,810,433,024: partitioned from ZeRO-2
        "optimizer": psi * (4 + 4) / 8,  # fp32 square average + fp32 master, partitioned: 7,241,732,096
        "reference": 2 * psi,  # a full bf16 copy on every GPU
        "activations": tokens * per_token + 512 * vocab * 4,  # + one chunk's float32 log-softmax: 22,320,939,008
        "buffers": 2 * 5e8 * 2,  # DeepSpeed's reduce and all-gather buckets in bf16
        "CUDA context": 1e9,
    }
    m = learner_memory(preset("hh_mistral7b", "deepspeed.zero_stage=2"), ModelShape.from_config(_shape("mistral-7b")))
    assert m.figures == pytest.approx(hand, rel=1e-12)
    assert m.peaks == {} and m.needed == pytest.approx(63_340_032_512, rel=1e-12)  # ZeRO-2 gathers nothing


def test_learner_figures_against_a_hand_computation_mixtral_zero3():
    """tldr_mixtral_weak_writer at ZeRO-3 over 16 learners, RMSprop, bf16, init: base, responses of 200 + EOS: today
    the whole model and the reference on every GPU while loading; partitioned, what it would need."""
    h, layers, vocab, kv, inter, experts = 4096, 32, 32000, 8 * 128, 14336, 8
    layer = 2 * h * h + 2 * h * kv + experts * 3 * h * inter + h * experts + 2 * h  # + router, 2 norms
    psi = layers * layer + 2 * vocab * h + h
    assert (layer, psi) == (1_451_270_144, 46_702_792_704)
    tokens = 2 * (1024 + 2 * 201)
    per_layer = 2 * (3 * h + 2 * kv + h + 2 * h + 2 * 4 * inter) + 2 * (6 * h)  # 2 experts a token, a copy each
    per_token = layers * per_layer + 6 * h
    hand = {
        "weights": 2 * psi / 16, "gradients": 2 * psi / 16, "optimizer": psi * 8 / 16, "reference": 2 * psi,
        "activations": tokens * per_token + 512 * vocab * 4,  # 30,414,831,616
        "buffers": layer * 2 + 5e8 * 2,  # a whole layer gathered (more than max_live 1e9) + the reduce bucket
        "CUDA context": 1e9,
    }
    cfg, shape = preset("tldr_mixtral_weak_writer"), ModelShape.from_config(_shape("mixtral-8x7b"))
    today = learner_memory(cfg, shape, TODAY)
    assert today.figures == pytest.approx(hand, rel=1e-12)
    steady = sum(hand.values())  # 163.8 GB while it trains
    assert today.peaks == pytest.approx({
        "while loading": 2 * psi + 2 * psi + 1e9,  # 187.8 GB: the whole model and the reference, before partitioning
        "while syncing": steady - hand["activations"] + 2 * psi - 2 * psi / 16,  # 220.9 GB: the model gathered
    }, rel=1e-12)
    assert today.needed == today.peaks["while syncing"]
    partitioned = learner_memory(cfg, shape, PARTITIONED)
    assert partitioned.figures["reference"] == 2 * psi / 16 and partitioned.peaks == {}
    assert partitioned.needed == pytest.approx(steady - 2 * psi + 2 * psi / 16, rel=1e-12)  # 76.2 GB


def _shape(name: str) -> dict:
    return json.loads((SHAPES_DIR / f"{name}.json").read_text())


def test_engine_figures_and_a_shared_gpu():
    """A vLLM engine's share of an L40S: 0.85 x 48 GB; Mixtral's weights over tensor parallel 4; a learner that shares
    its GPU with an engine has what the engine leaves."""
    lines, refusal = memory_plan(preset("tldr_mixtral_weak_writer"), _shape("mixtral-8x7b"), "test", A100, L40S,
                                 PARTITIONED)
    text = "\n".join(lines)
    assert refusal is None
    assert "    share            40.8   rollout.gpu_memory_utilization 0.85 of 48 GB" in text
    assert "    weights          23.4\n" in text  # 2 x 46,702,792,704 / 4
    # KV per token and GPU: 2 (k, v) x 32 layers x 8 heads x 128 x 2 bytes / 4 = 32,768 bytes
    assert f"~{(0.85 * 48e9 - 2 * 46_702_792_704 / 4) / 32768:,.0f} tokens" in text
    shared = preset("world_demo", "scaling.gpus_per_learner=0.5", "rollout.gpus_per_engine=0.5", "rollout.engine=vllm",
                    "rollout.weight_sync=object_store")
    _, refusal = memory_plan(shared, _shape("mistral-7b"), "test", A100, A100)
    assert refusal.startswith("learner GPU needs") and " of 12 GB " in refusal  # 80 x (1 - 0.85)


@pytest.mark.parametrize("overrides, line", [
    (["deepspeed.zero_stage=0"],
     "error: learner GPU needs 125.7 GB of 80 GB (weights 14.5, gradients 14.5, optimizer 57.9, reference 14.5, "
     "activations 22.3, buffers 1.0, CUDA context 1.0): set deepspeed.zero_stage=2"),
    (["deepspeed.zero_stage=2", "cluster.gpu_memory_gb=60"],
     "error: learner GPU needs 63.3 GB of 60 GB (weights 14.5, gradients 1.8, optimizer 7.2, reference 14.5, "
     "activations 22.3, buffers 2.0, CUDA context 1.0): set deepspeed.zero_stage=3"),
    (["rollout.gpu_memory_utilization=0.3"],
     "error: rollout engine GPU needs 14.7 GB of its 14.4 GB share (weights 14.5, KV cache 0.2 for 1,374-token "
     "sequences): raise rollout.tensor_parallel_size or rollout.gpu_memory_utilization"),
])
def test_a_plan_that_cannot_fit_is_refused_in_one_line(overrides, line, capsys):
    assert train_main(["--config", str(REPO / "configs" / "hh_mistral7b.yaml"), "--dry-run", *overrides]) == 2
    out, err = capsys.readouterr()
    assert "memory per GPU" in out and "does NOT fit" in out  # the plan is printed before the refusal
    assert err.strip() == line


def test_submitting_a_plan_that_cannot_fit_is_refused_before_anything_is_sent(capsys, monkeypatch):
    from cluster.submit import main as submit_main

    monkeypatch.chdir(REPO)
    assert submit_main(["--config", "configs/hh_mistral7b.yaml", "--dry-run", "deepspeed.zero_stage=0"]) == 2
    assert capsys.readouterr().err.startswith("error: learner GPU needs 125.7 GB of 80 GB (weights 14.5")


TRAIN_PRESETS = ["hh_mistral7b", "hh_mistral7b_lora", "tldr_mistral7b", "mtbench_multitask_sami",
                 "mtbench_multitask_sft", "gsm8k_sami", "gsm8k_sft", "gsm8k_sft_then_sami", "tiny", "world_demo"]


@pytest.mark.parametrize("name", TRAIN_PRESETS)
def test_every_preset_dry_run_prints_its_memory_plan(name, capsys):
    """(mtbench_multitask_dpo trains another run's export, which --dry-run refuses before any plan until it exists.)"""
    assert train_main(["--config", str(REPO / "configs" / f"{name}.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "memory per GPU" in out
    if name in ("tiny", "world_demo"):
        assert "no GPU: the learners and the rollout engines run on the CPU" in out
        return
    assert "learner GPU (1 of" in out and "on A100 80 GB (ray_cluster.yaml node type learner" in out
    assert "rollout engine GPU (vllm" in out and "on L40S 48 GB (ray_cluster.yaml node type rollout" in out
    assert "the fastest that fits: ZeRO-2" in out and preset(name).deepspeed.zero_stage == 2


def test_the_mixtral_preset_prints_its_plan_and_is_refused_with_todays_learner(capsys):
    assert train_main(["--config", str(REPO / "configs" / "tldr_mixtral_weak_writer.yaml"), "--dry-run"]) == 2
    out, err = capsys.readouterr()
    assert "    while loading   187.8   the whole model, 93.4 GB, and the reference, 93.4 GB, on the GPU before " \
           "ZeRO-3 partitions the model\n" in out
    assert err.strip() == (
        "error: learner GPU needs 220.9 GB of 80 GB while syncing (the whole model, 93.4 GB, gathered to sync it, "
        "beside the optimizer state, gradients and reference): no setting fits it on 80 GB GPUs with this learner, "
        "which loads the whole model on every GPU before ZeRO-3 partitions it, keeps a full reference copy on each "
        "and gathers the whole model on each to sync it")


def test_gpu_memory_from_the_node_type_or_the_setting():
    cfg = preset("hh_mistral7b")
    assert (role_gpu(cfg, "learner").gb, role_gpu(cfg, "rollout").gb) == (80, 48)
    cfg = preset("hh_mistral7b", "cluster.gpu_memory_gb=141")
    assert role_gpu(cfg, "learner") == Gpu("141 GB", 141, "cluster.gpu_memory_gb") == role_gpu(cfg, "rollout")
    with pytest.raises(ConfigError, match=r"cluster.gpu_memory_gb: Input should be greater than 0"):
        preset("hh_mistral7b", "cluster.gpu_memory_gb=0")


def test_model_config_from_a_folder_the_hub_cache_or_a_published_shape(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    config, source = model_config("mistralai/Mistral-7B-v0.1")
    assert source == "published shape configs/model_shapes/mistral-7b.json" and config["num_key_value_heads"] == 8
    snapshot = tmp_path / "hub" / "models--mistralai--Mistral-7B-v0.1" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 2}))
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("abc")
    config, source = model_config("mistralai/Mistral-7B-v0.1")
    assert source == str(snapshot / "config.json") and config["num_hidden_layers"] == 2  # the cached one first
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(_shape("llama-3-70b")))
    assert model_config(str(folder)) == (_shape("llama-3-70b"), str(folder / "config.json"))
    assert model_config("someone/unknown-model") == (None, "")


LLAMA_3_70B = ["--config", "configs/hh_mistral7b.yaml", "model.name_or_path=meta-llama/Meta-Llama-3-70B",
               "scaling.num_learners=16"]


@pytest.mark.parametrize("args", [
    ["--config", "configs/hh_mistral7b.yaml"],
    ["--config", "configs/tldr_mixtral_weak_writer.yaml"],
    ["--config", "configs/tldr_mixtral_weak_writer.yaml", "--learner", "partitioned"],
    LLAMA_3_70B,
    LLAMA_3_70B + ["--learner", "partitioned"],
    LLAMA_3_70B + ["--learner", "partitioned", "--checkpointing"],
])
def test_docs_tables_are_what_the_command_prints(args, capsys, monkeypatch):
    from pipelines.memory import main

    monkeypatch.chdir(REPO)
    assert main(args) == 0
    table = "\n".join(capsys.readouterr().out.splitlines()[2:])
    assert table.startswith("| ZeRO |") and table in (REPO / "docs" / "gpu.md").read_text()
