"""A small word-level tokenizer trained on the synthetic corpus (no download, built in ms)."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from alignkit.data.synthetic import corpus

SPECIALS = ["<pad>", "<eos>", "<unk>", "<bos>"]


def build_tokenizer(with_bos: bool = False) -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.WordLevel(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.train_from_iterator(corpus(), trainers.WordLevelTrainer(special_tokens=SPECIALS))
    if with_bos:
        # A Llama-like post-processor: BOS in front of every text, plus an EOS after it that
        # must NOT end up between a prompt and its answer.
        bos, eos = backend.token_to_id("<bos>"), backend.token_to_id("<eos>")
        backend.post_processor = processors.TemplateProcessing(
            single="<bos> $A <eos>", special_tokens=[("<bos>", bos), ("<eos>", eos)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="<eos>",
        unk_token="<unk>",
        bos_token="<bos>",
    )


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer()


@pytest.fixture(scope="session")
def bos_tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer(with_bos=True)
