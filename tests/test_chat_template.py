"""`prompt.template: chat`: an instruct model is asked and scored through its tokenizer's chat template, the
constitution as the system message (sami/prompts.py); the paper's base format stays the default."""
import json
import os
import shutil

import pytest

from sami.config import ConfigError, load_config
from sami.prompts import ChatPrompts, generation_prompt, prompt_format, training_prompt

# A chat template built here (no hub): role names the tiny tokenizer knows as words, no BOS in the text.
CHAT_TEMPLATE = ("{% set names = {'system': 'System', 'user': 'Human', 'assistant': 'Assistant'} %}"
                 "{% for m in messages %}{{ names[m['role']] }}: {{ m['content'] }}\n\n{% endfor %}"
                 "{% if add_generation_prompt %}Assistant:{% endif %}")
QUERIES = ["How do I bake bread?", "Tell me about the river.", "Tell me about the mountain.", "What is it?",
           "Is it tall?", "Is it long?", "Why is it cold?", "Where is the river?"]
PRINCIPLES = [{"name": "polite", "definition": "Be polite.", "antithesis": "Be curt."},
              {"name": "concise", "definition": "Be concise.", "antithesis": "Be verbose."}]


@pytest.fixture(scope="module")
def chat_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model, its tokenizer given a chat template (saved in the folder, as an instruct model's is)."""
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("tiny-chat") / "model"
    shutil.copytree(tiny_model_dir, out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(out)
    return out


def messages(constitution: str, query: str) -> list[dict]:
    return [{"role": "system", "content": "Write a response for the assistant that follows the principles in the "
                                          f"constitution.\n\nConstitution:\n{constitution}"},
            {"role": "user", "content": query}]


def test_chat_prompts_are_the_tokenizers_chat_template_and_the_default_is_the_papers_format(chat_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(chat_model_dir)
    chat = prompt_format("dialogue", "chat", tokenizer)
    constitution = "1. Be polite.\n2. Be concise."
    expected = ("System: Write a response for the assistant that follows the principles in the constitution.\n\n"
                "Constitution:\n1. Be polite.\n2. Be concise.\n\nHuman: How do I bake bread?\n\nAssistant:")
    assert training_prompt(chat, constitution, " How do I bake bread? ") == expected == generation_prompt(
        chat, constitution, "How do I bake bread?")
    assert expected == tokenizer.apply_chat_template(messages(constitution, "How do I bake bread?"), tokenize=False,
                                                     add_generation_prompt=True)
    assert load_config(None).prompt.template == "base" and prompt_format("dialogue", "base", tokenizer) == "dialogue"
    assert training_prompt("dialogue", constitution, "q").startswith("System: Write a response") and \
        "Assistant Constitution:" in training_prompt("dialogue", constitution, "q")
    no_template = AutoTokenizer.from_pretrained(chat_model_dir)
    no_template.chat_template = None
    with pytest.raises(ValueError, match="prompt.template is 'chat' but the model's tokenizer has no chat template"):
        prompt_format("dialogue", "chat", no_template)


def test_scored_prompt_ids_are_apply_chat_templates_tokens(chat_model_dir):
    from transformers import AutoTokenizer

    from sami.groups import QueryGroup, tokenise_group

    tokenizer = AutoTokenizer.from_pretrained(chat_model_dir)
    group = QueryGroup("q0", "Tell me about the river.", constitutions=["1. Be polite.", "1. Be curt."],
                       responses=["The river is long.", "It is long."])
    tokenise_group(group, tokenizer, ChatPrompts("dialogue", tokenizer), 128, 16)
    for constitution, ids in zip(group.constitutions, group.prompt_ids):
        encoded = tokenizer.apply_chat_template(messages(constitution, group.query), tokenize=True,
                                                add_generation_prompt=True)
        assert ids == list(getattr(encoded, "input_ids", encoded))  # apply_chat_template's own tokens, no BOS added


def test_a_chat_run_of_a_model_without_a_chat_template_is_refused_before_ray(tiny_model_dir, tmp_path):
    from pipelines.preflight import check_inputs

    cfg = load_config("configs/tiny.yaml", [f"run.output_dir={tmp_path}", f"model.name_or_path={tiny_model_dir}",
                                            "prompt.template=chat"])
    with pytest.raises(ConfigError, match=f"prompt.template is 'chat' but the tokenizer in {tiny_model_dir} has no "
                                          f"chat template"):
        check_inputs(cfg, contact_endpoints=False)
    with pytest.raises(ConfigError, match="model.name_or_path builtin:world-small is a base model without a chat"):
        check_inputs(load_config("configs/tiny.yaml", [f"run.output_dir={tmp_path}", "prompt.template=chat"]),
                     contact_endpoints=False)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_chat_template_run_trains_two_iterations_on_its_chat_prompts(chat_model_dir, tmp_path):
    """The whole loop (local Ray, an HF rollout engine, a DeepSpeed learner) with `prompt.template: chat`: two
    iterations, and every scored prompt in groups.parquet is what apply_chat_template makes of its constitution."""
    import pyarrow.parquet as pq
    import ray
    from transformers import AutoTokenizer

    from actors.ray_session import LOCAL_ENV
    from pipelines.train import run
    from sami.run_dir import RunDir

    (tmp_path / "queries.jsonl").write_text("".join(json.dumps({"query": q}) + "\n" for q in QUERIES))
    (tmp_path / "principles.yaml").write_text(json.dumps(PRINCIPLES))
    cfg = load_config("configs/tiny.yaml", [
        f"run.output_dir={tmp_path / 'run'}", f"model.name_or_path={chat_model_dir}", "prompt.template=chat",
        "data.source=jsonl", "data.task=dialogue", f"data.path={tmp_path / 'queries.jsonl'}", "data.max_queries=null",
        "data.heldout_queries=0", "principles.source=file", f"principles.path={tmp_path / 'principles.yaml'}",
        "principles.mode=antithesis_all", "principles.principles_per_constitution=null", "scaling.num_learners=1",
        "optim.groups_per_step=4", "optim.micro_batch_groups=2", "schedule.steps_per_iteration=1",
        "sampling.max_new_tokens=8", "filters.leak_patterns=[]", "filters.drop_identical=false",
        "filters.min_response_chars=0", "rollout.data_plane=direct"])
    env = {**LOCAL_ENV, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    os.environ.update(env)
    ray.init(num_cpus=6, include_dashboard=False, runtime_env={"env_vars": env}, log_to_driver=False)
    try:
        run_dir = RunDir(run(cfg))
    finally:
        ray.shutdown()
    rows = [json.loads(line) for line in run_dir.metrics.read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2] and all(r["groups"] == 4 for r in rows)
    tokenizer = AutoTokenizer.from_pretrained(chat_model_dir)
    for k in (1, 2):
        groups = pq.read_table(run_dir.groups(k)).to_pylist()
        assert len(groups) == 4
        for group in groups:
            for constitution, ids in zip(group["constitutions"], group["prompt_ids"]):
                encoded = tokenizer.apply_chat_template(messages(constitution, group["query"]), tokenize=True,
                                                        add_generation_prompt=True)
                assert list(ids) == list(getattr(encoded, "input_ids", encoded))


def test_the_evaluation_refuses_a_chat_run_it_cannot_render(tmp_path, capsys):
    from evals.run import main as eval_main
    from sami.config import dump_config

    dump_config(load_config("configs/tiny.yaml", [f"run.output_dir={tmp_path}", "prompt.template=chat"]),
                tmp_path / "config.yaml")
    assert eval_main(["--run", str(tmp_path), "--dry-run"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: --run {tmp_path}: the run trained with prompt.template 'chat', and the evaluation job renders the base "
        f"format only: its MI bound and responses would not be the run's prompts")
