"""Multi-turn policy-gradient training with an environment and a tool.

The toy task: each episode's reward is locked behind a tool. The model gets reward 1 when it
has called ``unlock`` (which returns a code it cannot know) before it answers, 0 when it answers
straight away. A short SFT warm-up shows both ways in equal parts (call, read the code, answer
"ok"; answer "ok" at once), so the model starts by calling about half of the time; GRPO on whole
episodes, the tool's tokens masked out of the loss, must move the first turn's decision: the
reward arrives two turns after the call. (Copying the tool's value into the answer would be the
natural next task, but a 2-layer model needs several hundred SFT steps to learn to copy, more
than a test should spend.) A second test runs every policy-gradient preset through
``build_pg_trainer`` with an ``environment`` setting.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from llama_helpers import build_llama
from metric_helpers import is_clock_metric
from transformers import AutoTokenizer, LlamaForCausalLM

from alignkit.config import load_config
from alignkit.errors import ConfigError
from alignkit.models.forward import token_logprobs
from alignkit.rollout.chat_stream import Conversation
from alignkit.rollout.environments import Environment, Step
from alignkit.rollout.episodes import EnvironmentRollout, EpisodeLimits
from alignkit.rollout.tool_calls import register_tool_format
from alignkit.rollout.tools import ToolCall
from alignkit.tracking import read_metrics
from alignkit.trainers.pg import PolicyGradientTrainer, build_pg_trainer
from alignkit.trainers.registry import get_method
from alignkit.trainers.rl_config import PGConfig

#: Only an asynchronous run logs these (how long the main thread waited, the staleness).
_ASYNC_ONLY = ("timing/rollout_wait", "rollout/policy_staleness")
TOKENIZER = Path(__file__).resolve().parents[1] / "rollout" / "chat_tokenizers" / "smollm2"


@register_tool_format("unlock", lambda schemas: "? unlocks.", lambda call: "?")
def parse_unlock(text: str) -> tuple[list[ToolCall], list[str]]:
    """The toy format: a message that is exactly '?' calls unlock()."""
    return ([ToolCall("unlock", {})], []) if text.strip() == "?" else ([], [])


_CODES = random.Random(0)


class Locked(Environment):
    """Reward 1 for an answer given after the ``unlock`` tool was called, 0 before."""

    def __init__(self) -> None:
        super().__init__(system="Get the code.")
        self.code = str(_CODES.randrange(10))
        self.unlocked = False
        self.tools = (self.unlock,)

    def unlock(self) -> str:
        """Unlock the reward; returns the code."""
        self.unlocked = True
        return self.code

    def step(self, message):
        return Step(reward=float(self.unlocked), done=True)


def tiny_model(tokenizer) -> LlamaForCausalLM:
    return build_llama(
        len(tokenizer),
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def warm_up(model, rollout: EnvironmentRollout, steps: int = 40) -> None:
    """SFT on 32 demonstrations: the odd ones call the tool then answer "ok", the even ones
    answer "ok" at once."""
    renderer, eos = rollout.renderer, rollout.tokenizer.eos_token_id
    rows = []
    for i in range(32):
        env = Locked()
        conv = Conversation.start(renderer, rollout.start_messages(env, {"prompt": f"go {i % 8}"}))
        if i % 2:
            conv.add_assistant([*renderer.encode("?"), eos], [0.0, 0.0], renderer)
            conv.add_environment(
                [{"role": "tool", "name": "unlock", "content": env.code}], renderer
            )
        conv.add_assistant([*renderer.encode("ok"), eos], [0.0] * 3, renderer)
        rows.append(conv)
    width = max(len(c.ids) for c in rows)
    ids = torch.tensor([c.ids + [0] * (width - len(c.ids)) for c in rows])
    mask = torch.tensor([c.sampled + [False] * (width - len(c.ids)) for c in rows])
    attention = torch.tensor([[1] * len(c.ids) + [0] * (width - len(c.ids)) for c in rows])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        logp = token_logprobs(model, {"input_ids": ids, "attention_mask": attention}, mask)
        loss = -logp.sum() / mask.sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@pytest.fixture(scope="module")
def warm_model(tmp_path_factory) -> Path:
    """The tiny model after the warm-up, saved with its tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    rollout = EnvironmentRollout(Locked, tokenizer, tool_format="unlock")
    model = tiny_model(tokenizer)
    warm_up(model, rollout)
    path = tmp_path_factory.mktemp("warm") / "model"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_grpo_learns_to_call_the_tool_that_unlocks_the_reward(tmp_path, warm_model):
    tokenizer = AutoTokenizer.from_pretrained(warm_model)
    limits = EpisodeLimits(max_turns=3, max_length=200)
    rollout = EnvironmentRollout(
        Locked, tokenizer, limits, tool_format="unlock", check_streams=True
    )
    model = LlamaForCausalLM.from_pretrained(warm_model)
    rows = [{"prompt": f"go {i}"} for i in range(8)]
    cfg = load_config(
        PGConfig,
        None,
        [
            *get_method("grpo").defaults,
            f"output_dir={tmp_path}",
            "run_name=secret",
            "rollout.prompts_per_iteration=8",
            "rollout.samples_per_prompt=8",
            "rollout.max_new_tokens=4",
            "train.iterations=30",
            "train.sequences_per_device=64",
            "optim.lr=3e-3",
            "optim.schedule=constant",
            "kl.coef=0",
            "logging.every=1",
            "logging.progress_bar=false",
            "logging.plots=false",
        ],
    )
    trainer = PolicyGradientTrainer(
        cfg,
        model,
        tokenizer,
        rollout.prompts_from_rows(rows, 64),
        None,
        rollout=rollout,
    )
    trainer.train()
    records = read_metrics(trainer.run_dir.metrics_path)
    rollouts = [r for r in records if "env/tool_calls_mean" in r]
    calls = [r["env/tool_calls_mean"] for r in rollouts]
    assert all(r["env/stream_text_mismatch_frac"] == 0.0 for r in rollouts)
    assert all(r["env/stream_template_side_mismatch_frac"] == 0.0 for r in rollouts)
    assert sum(calls[:3]) / 3 < 0.8, calls  # the warm-up calls about half of the time
    assert sum(calls[-3:]) / 3 > 0.95, calls  # GRPO made it call every time
    rewards = [r["reward/mean"] for r in rollouts]
    assert sum(rewards[:3]) / 3 < 0.75 and sum(rewards[-3:]) / 3 > 0.95, rewards


class FixedLocked(Locked):
    """``Locked`` with the same code in every episode: two runs see the same tool results."""

    def __init__(self) -> None:
        super().__init__()
        self.code = "7"


def _locked_run(tmp_path, warm_model, name: str, *extra: str):
    """GRPO on ``FixedLocked`` episodes (8 prompts x 8 samples) from a config, 4 held-out
    prompts; the trainer and its iterations' metrics."""
    (tmp_path / "prompts.jsonl").write_text(
        "".join(f'{{"prompt": [{{"role": "user", "content": "go {n}"}}]}}\n' for n in range(8))
    )
    environment = (
        f"{{name: '{Path(__file__)}:FixedLocked', tool_format: unlock, max_turns: 3, "
        "max_length: 200}"
    )
    cfg = load_config(
        PGConfig,
        None,
        [
            *get_method("grpo").defaults,
            f"output_dir={tmp_path}",
            f"run_name={name}",
            f"model.name={warm_model}",
            f"data.train_file={tmp_path / 'prompts.jsonl'}",
            f"data.eval_file={tmp_path / 'prompts.jsonl'}",
            "data.max_eval_prompts=4",
            f"environment={environment}",
            "rollout.prompts_per_iteration=8",
            "rollout.samples_per_prompt=8",
            "rollout.max_new_tokens=4",
            "train.sequences_per_device=64",
            "optim.lr=3e-3",
            "optim.schedule=constant",
            "kl.coef=0",
            "logging.every=1",
            "logging.progress_bar=false",
            "logging.plots=false",
            *extra,
        ],
    )
    trainer = build_pg_trainer(cfg)
    trainer.train()
    records = read_metrics(trainer.run_dir.metrics_path)
    return trainer, [r for r in records if "reward/mean" in r]


def test_asynchronous_episodes_reproduce_the_synchronous_run_and_run_one_update_ahead(
    tmp_path, warm_model
):
    """``rollout.max_staleness`` with an environment: each batch's episodes travel with it
    (``Experience.episodes``), so batch i is scored while the worker plays batch i+1."""
    runs = {}
    for name, extra in (("sync", ()), ("async0", ("rollout.max_staleness=0",))):
        trainer, records = _locked_run(
            tmp_path, warm_model, name, "train.iterations=3", "eval.every=2", *extra
        )
        runs[name] = records, [p.detach().clone() for p in trainer.unwrapped_model.parameters()]
    (sync, sync_weights), (async0, async_weights) = runs["sync"], runs["async0"]
    assert [r["rollout/policy_staleness"] for r in async0] == [0.0] * 3
    assert all(r["env/tool_calls_mean"] > 0 for r in sync)  # the env metrics are there
    for want, have in zip(sync, async0, strict=True):
        for key in want.keys() | have.keys():
            if not is_clock_metric(key) and key not in _ASYNC_ONLY:
                assert have[key] == want[key], (want["step"], key)  # bit for bit
    assert all(torch.equal(a, b) for a, b in zip(sync_weights, async_weights, strict=True))

    # Evaluations in between (their episodes are played while a batch is in flight).
    trainer, records = _locked_run(
        tmp_path,
        warm_model,
        "async1",
        "train.iterations=20",
        "train.samples_every=1",
        "eval.every=3",
        "rollout.max_staleness=1",
    )
    assert [r["rollout/policy_staleness"] for r in records] == [0.0] + [1.0] * 19
    assert all("rollout/is_weight_mean" in r for r in records[1:])  # stale batches corrected
    # Each batch is scored from its own episodes (not the ones the worker plays meanwhile):
    # every rewarded transcript holds the tool's result.
    for path in sorted((trainer.run_dir.root / "samples").glob("iteration-*.jsonl")):
        samples = [json.loads(line) for line in path.read_text().splitlines()]
        assert all("7" in s["completion"] for s in samples if s["reward"] == 1.0), path.name
    calls = [r["env/tool_calls_mean"] for r in records]
    rewards = [r["reward/mean"] for r in records]
    assert sum(rewards[:3]) / 3 < 0.75 and sum(rewards[-3:]) / 3 > 0.9, (rewards, calls)


@pytest.mark.parametrize("method", ["grpo", "rloo", "reinforce++", "ppo"])
def test_every_preset_trains_on_multi_turn_episodes(tmp_path, warm_model, method):
    """The ``environment`` setting from a config, through ``build_pg_trainer`` (this file's
    ``Locked`` environment, imported by path)."""
    (tmp_path / "prompts.jsonl").write_text(
        "".join(f'{{"prompt": [{{"role": "user", "content": "go {n}"}}]}}\n' for n in range(4))
    )
    environment = (
        f"{{name: '{Path(__file__)}:Locked', tool_format: unlock, max_turns: 3, max_length: 200}}"
    )
    cfg = load_config(
        PGConfig,
        None,
        [
            *get_method(method).defaults,
            f"output_dir={tmp_path}",
            f"run_name={method}",
            f"model.name={warm_model}",
            f"data.train_file={tmp_path / 'prompts.jsonl'}",
            f"environment={environment}",
            "rollout.prompts_per_iteration=4",
            "rollout.samples_per_prompt=4",
            "rollout.max_new_tokens=4",
            "train.iterations=2",
            "train.sequences_per_device=8",
            "logging.every=1",
            "logging.progress_bar=false",
            "logging.plots=false",
        ],
    )
    trainer = build_pg_trainer(cfg)
    trainer.train()
    records = [r for r in read_metrics(trainer.run_dir.metrics_path) if "actor/pg_loss" in r]
    assert len(records) == 2
    for record in records:
        assert 1.0 < record["env/turns_mean"] <= 2.0 and record["env/tool_calls_mean"] > 0
        assert all(v == v for v in record.values() if isinstance(v, float))  # no NaN
    samples = (trainer.run_dir.root / "samples" / "iteration-000001.jsonl").read_text()
    assert '"reward": 1.0' in samples and '"reward": 0.0' in samples


@pytest.mark.parametrize(
    ("example", "task"),
    [("grpo_reasoning_gym.yaml", "chain_sum"), ("grpo_tool_calculator.yaml", "products")],
)
def test_the_smollm2_examples_run_as_written_on_small_data(
    example, task, warm_model, tmp_path, monkeypatch
):
    """The examples' configs as they are, on 8 reasoning-gym rows and a tiny model with
    SmolLM2's chat template (the real runs' numbers are in examples/README.md)."""
    import yaml

    from alignkit.cli import main
    from alignkit.rollout.verifiers.reasoning_tasks import reasoning_gym_rows

    examples = Path(__file__).resolve().parents[2] / "examples"
    settings = yaml.safe_load((examples / example).read_text())
    monkeypatch.chdir(tmp_path)
    for key in ("train_file", "eval_file"):
        path = tmp_path / settings["data"][key]
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = reasoning_gym_rows(task, 8, 1, min_terms=2, max_terms=2, min_digits=1, max_digits=2)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    overrides = [
        f"model.name={warm_model}",
        "model.lora=null",
        "train.iterations=1",
        "rollout.prompts_per_iteration=2",
        "rollout.max_new_tokens=4",
        "data.max_eval_prompts=2",
        "logging.progress_bar=false",
        "logging.plots=false",
    ]
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "grpo", "-c", str(examples / example), *overrides])
    assert exit_info.value.code in (0, None)
    summary = json.loads((tmp_path / "runs" / settings["run_name"] / "summary.json").read_text())
    assert summary["step"] == 1 and "eval/reward" in summary["initial_eval"]


def test_vllm_needs_a_context_that_holds_an_episode(tmp_path):
    """Later turns continue conversations of up to environment.max_length tokens: a server
    with a shorter context would refuse them mid-run."""
    settings = [
        *get_method("grpo").defaults,
        f"output_dir={tmp_path}",
        "data.train_file=prompts.jsonl",
        "data.max_prompt_length=64",
        "rollout.max_new_tokens=16",
        "rollout.engine=vllm",
        "environment={name: calculator, max_length: 300}",
    ]
    with pytest.raises(ConfigError, match=r"below environment.max_length = 300"):
        load_config(PGConfig, None, [*settings, "rollout.vllm.max_model_len=256"])
    load_config(PGConfig, None, [*settings, "rollout.vllm.max_model_len=300"])
