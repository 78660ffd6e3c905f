"""The learner scores exactly the token ids vLLM sampled, with a SentencePiece-style tokenizer (Llama's and
Mistral's kind): vLLM's completions' ids are what the groups hand the learner, vLLM ran every prompt with one BOS,
and the response's text tokenised again gives other ids (the HF engine: tests/test_sampled_ids.py)."""
from actors.rollout import RolloutWorker
from sami.config import RolloutConfig
from sampled_ids import MODEL_CFG, check_the_learner_scores_what_was_sampled


def test_the_learner_scores_the_ids_vllm_sampled(sentencepiece_model_dir):
    rollout = RolloutConfig(engine="vllm", gpu_memory_utilization=0.2, enforce_eager=True)
    worker = RolloutWorker(str(sentencepiece_model_dir), rollout, MODEL_CFG)
    llm, ran = worker.engine.llm, []
    generate_outputs = llm.generate

    def recording(*args, **kwargs):  # the prompt ids vLLM itself reports it ran (RequestOutput.prompt_token_ids)
        outputs = generate_outputs(*args, **kwargs)
        ran.extend(list(o.prompt_token_ids) for o in outputs)
        return outputs

    llm.generate = recording
    check_the_learner_scores_what_was_sampled(worker, sentencepiece_model_dir, ran)
