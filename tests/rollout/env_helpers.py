"""Shared by the environment tests: the two chat tokenizers shipped with the tests, a tiny Llama
for them that ends its turns often, and a scripted engine that writes chosen replies."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from llama_helpers import build_llama
from transformers import AutoTokenizer

from alignkit.rollout import Experience, Prompt, SamplingConfig
from alignkit.rollout.engine import assemble_experience, pad_prompts

TOKENIZERS = Path(__file__).parent / "chat_tokenizers"
CHAT_TEMPLATES = ("smollm2", "qwen2")


def chat_tokenizer(name: str):
    """SmolLM2's tokenizer cut to 1024 ids, or the Qwen2-style one (see chat_tokenizers/build.py)."""
    return AutoTokenizer.from_pretrained(TOKENIZERS / name)


def turn_ending_llama(tokenizer, seed: int = 0, eos_bias: float = 3.0, hidden: int = 32):
    """A one-layer Llama over the tokenizer's vocabulary whose LM head has a bias that makes EOS
    likely (turns of a few tokens), seeded; a real model for the engine and the trainer."""
    model = build_llama(
        len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=1,
        max_position_embeddings=4096,
        seed=seed,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    # skip_init: the head's weights are copied in, so it draws nothing from the random state.
    head = torch.nn.utils.skip_init(torch.nn.Linear, hidden, len(tokenizer), bias=True)
    head.weight.data.copy_(model.lm_head.weight.data)
    head.bias.data.zero_()
    head.bias.data[tokenizer.eos_token_id] = eos_bias
    model.lm_head = head
    return model.eval()


class ScriptedEngine:
    """Writes ``reply(prompt_text)`` for every prompt: its canonical token ids then EOS, each
    with log-prob -1 (a stand-in for sampling, through the same contract as a real engine)."""

    logprobs_match_trainer = False
    needs_weight_sync = False

    def __init__(self, tokenizer, reply: Callable[[str], str]) -> None:
        self.tokenizer, self.reply = tokenizer, reply
        self.calls: list[int] = []  # prompts per generate call

    def samples_policy(self, sampling: SamplingConfig) -> bool:
        return False

    def sync_weights(self, model) -> None: ...

    def set_iteration(self, iteration: int) -> None: ...

    def stats(self) -> dict[str, float]:
        return {}

    def generate(
        self,
        prompts: Sequence[Prompt],
        sampling: SamplingConfig,
        *,
        generator: torch.Generator,
        group_offset: int = 0,
    ) -> Experience:
        self.calls.append(len(prompts))
        tok, g = self.tokenizer, sampling.samples_per_prompt
        replies = [
            tok(self.reply(tok.decode(p.input_ids)), add_special_tokens=False)["input_ids"]
            + [tok.eos_token_id]
            for p in prompts
            for _ in range(g)
        ]
        replies = [r[: sampling.max_new_tokens] for r in replies]
        steps = max(len(r) for r in replies)
        tokens = torch.full((len(replies), steps), tok.pad_token_id)
        for i, r in enumerate(replies):
            tokens[i, : len(r)] = torch.tensor(r)
        lengths = torch.tensor([len(r) for r in replies])
        ids, mask, _ = pad_prompts(prompts, tok.pad_token_id, torch.device("cpu"))
        behaviour = -(torch.arange(steps)[None, :] < lengths[:, None]).float()
        return assemble_experience(
            prompts, tok, ids, mask, tokens, behaviour, lengths,
            SamplingConfig(max_new_tokens=steps, samples_per_prompt=g), group_offset,
        )  # fmt: skip
