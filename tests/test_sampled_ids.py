"""The learner scores exactly the token ids the HF engine sampled, with a SentencePiece-style tokenizer (Llama's and
Mistral's kind), where the response's text tokenised again gives other ids (the vLLM lane:
vllm_lane/test_sampled_ids.py)."""
import pytest

from actors.rollout import RolloutWorker
from sami.config import RolloutConfig
from sami.groups import prompt_token_ids
from sampled_ids import MODEL_CFG, check_the_learner_scores_what_was_sampled

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def worker(sentencepiece_model_dir):
    """The rollout actor's body over an HFEngine."""
    return RolloutWorker(str(sentencepiece_model_dir), RolloutConfig(engine="hf"), MODEL_CFG)


def test_the_learner_scores_the_ids_the_hf_engine_sampled(worker, sentencepiece_model_dir):
    model, ran = worker.engine.model, []
    generate_ids = model.generate

    def recording(**kwargs):  # what the model generated from: each prompt's ids with the left padding removed
        ran.extend(row[mask.bool()].tolist() for row, mask in zip(kwargs["input_ids"], kwargs["attention_mask"]))
        return generate_ids(**kwargs)

    model.generate = recording
    check_the_learner_scores_what_was_sampled(worker, sentencepiece_model_dir, ran)


def test_a_prompt_that_already_starts_with_bos_keeps_one(worker):
    """A chat template renders the BOS into the text (Llama 2's, Mistral's): the engines must not add a second one."""
    tok = worker.engine.tokenizer
    rendered = "<s>[INST] Hi [/INST]"
    (ids,) = prompt_token_ids(tok, [rendered])
    assert ids == tok(rendered, add_special_tokens=False).input_ids and ids.count(tok.bos_token_id) == 1
    assert tok(rendered).input_ids == [tok.bos_token_id] + ids  # what the tokenizer alone would have sent
    assert prompt_token_ids(tok, [rendered], 4) == [ids[:1] + ids[-3:]]  # a long one keeps its BOS and its end
