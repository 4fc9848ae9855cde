"""The pad-token rule every tokenizer alignkit loads or writes follows.

A tokenizer without a pad token gets its eos token as pad (no new embedding row, so the model is
unchanged), and the model's ``config.pad_token_id`` is set to match. Because pad may then equal
eos, code must build masks from lengths or the attention mask, never from
``input_ids == pad_token_id``.
"""

from __future__ import annotations

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from alignkit.errors import ModelError

__all__ = ["ensure_pad_token"]


def ensure_pad_token(
    tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel | None = None
) -> PreTrainedTokenizerBase:
    """Give ``tokenizer`` a pad token (its eos) if it has none; make ``model``'s config match."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelError(
                "the tokenizer has neither a pad nor an eos token; add a pad token to it "
                "(tokenizer.add_special_tokens) and resize the model's embeddings"
            )
        tokenizer.pad_token = tokenizer.eos_token
    if model is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
        generation = getattr(model, "generation_config", None)
        if generation is not None and generation.pad_token_id is None:
            generation.pad_token_id = tokenizer.pad_token_id
    return tokenizer
