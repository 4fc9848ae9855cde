"""Shared by the rollout tests: a tiny-vocabulary Llama (`llama_helpers.build_llama`), a tokenizer
stub for it, and Pearson's chi-square p-value."""

from __future__ import annotations

import torch
from llama_helpers import build_llama
from transformers import LlamaForCausalLM

PAD, EOS = 0, 1


class TinyVocabTokenizer:
    """What the engines need from a tokenizer (pad, EOS, vocabulary, decoding), for token ids
    ``0..V-1`` named by their numbers (or the given vocabulary)."""

    pad_token_id, eos_token_id = PAD, EOS

    def __init__(self, vocab: int | dict[str, int]) -> None:
        self.vocab = vocab if isinstance(vocab, dict) else {str(i): i for i in range(vocab)}

    def get_vocab(self) -> dict[str, int]:
        return dict(self.vocab)

    def __len__(self) -> int:
        return len(self.vocab)

    def batch_decode(self, rows, skip_special_tokens=True):
        special = {PAD, EOS} if skip_special_tokens else set()
        return [" ".join(str(i) for i in row if i not in special) for row in rows]


def tiny_llama(vocab: int, seed: int, hidden: int, scale: float) -> LlamaForCausalLM:
    """A one-layer Llama with ``vocab`` tokens, seeded, its LM head scaled by ``scale`` (larger
    logits than the default init: a distribution far from uniform), in eval mode."""
    model = build_llama(
        vocab,
        hidden_size=hidden,
        num_hidden_layers=1,
        seed=seed,
        pad_token_id=PAD,
        eos_token_id=EOS,
        bos_token_id=2,
    )
    model.lm_head.weight.data.mul_(scale)
    return model.eval()


def chi_square_pvalue(observed: torch.Tensor, expected: torch.Tensor) -> float:
    """Pearson's goodness-of-fit p-value: P(chi2_{k-1} >= sum (o - e)^2 / e)."""
    statistic = ((observed - expected) ** 2 / expected).sum()
    dof = torch.tensor(observed.numel() - 1, dtype=torch.double)
    return float(1 - torch.special.gammainc(dof / 2, statistic / 2))
