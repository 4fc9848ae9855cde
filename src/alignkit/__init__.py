"""alignkit: align language models with feedback.

The main entry points are importable from the top level (loaded on first use, so
``import alignkit`` and the CLI stay fast)::

    import alignkit

    cfg = alignkit.load_config(alignkit.SFTConfig, "examples/sft.yaml", ["max_steps=10"])
    summary = alignkit.train_sft(cfg)                       # also train_dpo, train_safe_dpo,
                                                             # train_reward
    summary = alignkit.train_grpo(                          # also train_ppo, train_rloo,
        "examples/grpo.yaml",                               # train_reinforce_pp,
        model=summary["last_checkpoint"] + "/model",        # train_reinforce, train_safe_ppo
        reward_funcs=my_reward,                             # TRL's reward contract
        train_dataset=dataset,                              # a datasets.Dataset or rows
    )
    model, tokenizer = alignkit.load_policy(summary["last_checkpoint"] + "/model")
    answers = alignkit.generate_responses(model, tokenizer, ["How do I bake bread?"])
    scorer = alignkit.RewardScorer("runs/rm")               # a reward or cost model (or its run)
    scores = scorer(["How do I bake bread?"], answers, [])  # one score per (prompt, answer)
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: Public name -> module that defines it.
_EXPORTS = {
    "load_config": "alignkit.config",
    "TrainConfig": "alignkit.config",
    "SFTConfig": "alignkit.trainers.sft",
    "train_sft": "alignkit.trainers.sft",
    "build_sft_trainer": "alignkit.trainers.sft",
    "DPOConfig": "alignkit.trainers.dpo",
    "train_dpo": "alignkit.trainers.dpo",
    "build_dpo_trainer": "alignkit.trainers.dpo",
    "SafeDPOConfig": "alignkit.trainers.safe_dpo",
    "train_safe_dpo": "alignkit.trainers.safe_dpo",
    "build_safe_dpo_trainer": "alignkit.trainers.safe_dpo",
    "RewardConfig": "alignkit.trainers.reward",
    "train_reward": "alignkit.trainers.reward",
    "build_reward_trainer": "alignkit.trainers.reward",
    "PGConfig": "alignkit.trainers.rl_config",
    "SafePPOConfig": "alignkit.trainers.safe_ppo_config",
    "train_online": "alignkit.trainers.online_api",
    "train_grpo": "alignkit.trainers.online_api",
    "train_ppo": "alignkit.trainers.online_api",
    "train_rloo": "alignkit.trainers.online_api",
    "train_reinforce_pp": "alignkit.trainers.online_api",
    "train_reinforce": "alignkit.trainers.online_api",
    "train_safe_ppo": "alignkit.trainers.online_api",
    "register_reward": "alignkit.rollout.registry",
    "load_policy": "alignkit.models",
    "load_tokenizer": "alignkit.models",
    "load_reward_model": "alignkit.models",
    "save_model": "alignkit.models",
    "generate_responses": "alignkit.rollout",
    "SamplingConfig": "alignkit.rollout",
    "load_records": "alignkit.data",
    "validate_records": "alignkit.data",
}
_RENAMED = {"RewardScorer": ("alignkit.rollout.rewards", "ModelReward")}

__all__ = ["__version__", *_EXPORTS, *_RENAMED]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in _RENAMED:
        module, attr = _RENAMED[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'alignkit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
