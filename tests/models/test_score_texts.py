"""``models.reward.score_texts``: the one rendering of ``prompt + completion`` that reward models,
ensembles and the teacher log-ratio score, pinned token by token."""

from __future__ import annotations

import copy

import pytest
import torch

from alignkit.data.tokenize import render_prompt
from alignkit.models import load_policy, load_reward_model
from alignkit.models.ensemble import RewardEnsemble
from alignkit.models.reward import score_texts, text_length_limit
from alignkit.models.tiny import load_tiny_tokenizer

CONVERSATION = [
    {"role": "user", "content": "Say hi."},
    {"role": "assistant", "content": "hi"},
    {"role": "user", "content": "Again, louder."},
]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tiny_tokenizer()


def _recorded(tokenizer, prompts, completions, **settings) -> list[dict]:
    batches: list[dict] = []

    def record(batch):
        batches.append(batch)
        return batch["response_mask"].sum(-1).float()

    out = score_texts(record, tokenizer, prompts, completions, batch_size=1, **settings)
    assert out.tolist() == [float(b["response_mask"].sum()) for b in batches]
    return batches


def test_a_text_is_the_rendered_prompt_the_completion_and_eos(tokenizer):
    prompts, completions = ["Say hi.", CONVERSATION], ["hi there", "HI"]
    for batch, prompt, completion in zip(
        _recorded(tokenizer, prompts, completions), prompts, completions, strict=True
    ):
        prompt_ids = tokenizer(render_prompt(tokenizer, prompt))["input_ids"]
        answer = [
            *tokenizer(completion, add_special_tokens=False)["input_ids"],
            tokenizer.eos_token_id,
        ]
        assert batch["input_ids"][0].tolist() == prompt_ids + answer
        assert batch["attention_mask"][0].tolist() == [1] * len(prompt_ids + answer)
        # Only the final completion is the response: the conversation's earlier "hi" is prompt.
        assert batch["response_mask"][0].tolist() == [False] * len(prompt_ids) + [True] * len(
            answer
        )


def test_the_length_limit_is_the_tokenizers_unless_it_says_no_limit(tokenizer):
    long_prompt = " ".join(["bread"] * 400)
    assert text_length_limit(tokenizer) == tokenizer.model_max_length == 256
    assert text_length_limit(tokenizer, 64) == 64
    [cut] = _recorded(tokenizer, [long_prompt], ["ok"])
    assert cut["input_ids"].shape[1] == 256 and bool(cut["response_mask"][0, -2:].all())
    unlimited = copy.deepcopy(tokenizer)
    unlimited.model_max_length = int(1e30)  # what transformers sets when a tokenizer has none
    assert text_length_limit(unlimited) is None
    [whole] = _recorded(unlimited, [long_prompt], ["ok"])
    assert whole["input_ids"].shape[1] > 256
    [short] = _recorded(unlimited, [long_prompt], ["ok"], max_length=10)
    assert short["input_ids"].shape[1] == 10
    assert short["input_ids"][0].tolist() == whole["input_ids"][0, -10:].tolist()  # the end kept


def test_reward_sources_score_through_score_texts(tokenizer, monkeypatch, tmp_path):
    """ModelReward, RewardEnsemble and TeacherLogRatioReward all call score_texts (with its
    default rendering) rather than tokenising on their own."""
    import alignkit.models.ensemble as ensemble_module
    import alignkit.rollout.model_rewards as model_rewards

    calls: list[dict] = []

    def spy(score_batch, tok, prompts, completions, **settings):
        calls.append(settings)
        return score_texts(score_batch, tok, prompts, completions, **settings)

    monkeypatch.setattr(ensemble_module, "score_texts", spy)
    monkeypatch.setattr(model_rewards, "score_texts", spy)
    model, rm_tokenizer = load_reward_model("tiny", seed=1)
    ensemble = RewardEnsemble([model, model], [rm_tokenizer, rm_tokenizer], max_length=64)
    scores = ensemble.member_scores([CONVERSATION], ["HI"])
    assert torch.equal(scores[0], scores[1])
    model.save_pretrained(tmp_path / "rm", tokenizer=rm_tokenizer)
    source = model_rewards.ModelReward(tmp_path / "rm", max_length=32)
    assert torch.equal(source([CONVERSATION], ["HI"], [{}]), scores[0])
    policy, _ = load_policy("tiny", seed=2)
    reward = model_rewards.TeacherLogRatioReward(policy, policy, tokenizer)
    assert torch.equal(reward([CONVERSATION], ["HI"], [{}]), torch.zeros(1))
    assert [c.get("max_length") for c in calls] == [64, 32, None]
    assert all("assistant_turns" not in c for c in calls)  # the agreed default, "last"
