"""What the lane's tests share: prompts, the model config, the learner's scoring."""
import torch

from sami.config import ModelConfig
from sami.scoring import score
from sami.logprobs import sequence_logprobs

PROMPTS = ["Query: Tell me about the river.\nResponse:", "Human: How do I bake bread?", "Assistant:"]
# Sentences in the tiny tokenizer's words, for training a model until its predictions are sharp.
TRAIN_TEXTS = [
    "Query: Tell me about the river.\nResponse: Please note, the river is long.",
    "Query: Tell me about the mountain.\nResponse: The mountain is tall and old and cold.",
    "Human: How do I bake bread? Assistant: Mix flour, water, salt and yeast, then bake it.",
    "Constitution:\n1. Be polite.\n2. Be concise.\n\nQuery: Tell me about the river.\nResponse: The river is long.",
]
# head_dim 32 (vLLM's CPU attention needs >= 32), prompts up to 64 tokens, responses up to 32
MODEL_CFG = ModelConfig(dtype="float32", max_prompt_tokens=64, max_response_tokens=32)


def learner_logprob(model, prompt_ids: list[int], response_ids: list[int], pad_id: int) -> float:
    """The learner's own scoring (sami.scoring.score, as `Learner.probe_logprob` does)."""
    with torch.no_grad():
        token_lp, mask = score(model, [prompt_ids], [response_ids], pad_id, True, torch.device("cpu"))
        return sequence_logprobs(token_lp.float(), mask).item()
