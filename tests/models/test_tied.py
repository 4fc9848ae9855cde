"""The tied embedding's gradient accumulated in place (`models.tied`): the same gradient."""

from __future__ import annotations

import copy

import pytest
import torch

from alignkit.models import load_policy
from alignkit.models.forward import token_logprobs
from alignkit.models.tied import accumulate_tied_embedding_grad


def _batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, 1024, (4, 12), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 9:] = 0
    attention_mask[3, 6:] = 0
    input_ids[1, 9:] = 0
    input_ids[3, 6:] = 0
    input_ids[0, 2] = input_ids[2, 5] = input_ids[0, 7]  # a token used three times
    response_mask = attention_mask.clone()
    response_mask[:, :4] = 0
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "response_mask": response_mask,
    }


def _grads(model, batch, packed: bool, passes: int = 1) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    for _ in range(passes):  # several backward passes accumulate into .grad
        logps = token_logprobs(model, batch, batch["response_mask"], packed=packed)
        logps.sum().backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(("packed", "passes"), [(False, 1), (True, 1), (True, 2)])
def test_tied_grads_equal_autograds_sum(packed: bool, passes: int) -> None:
    reference = load_policy("tiny", seed=0)[0].train()
    model = copy.deepcopy(reference)
    embedding = model.get_input_embeddings()
    assert model.get_output_embeddings().weight is embedding.weight  # the preset is tied
    assert accumulate_tied_embedding_grad(model)
    batch = _batch()
    expected, got = _grads(reference, batch, packed, passes), _grads(model, batch, packed, passes)
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(
            got[name], expected[name], rtol=1e-5, atol=1e-6
        )  # addition order
    # The pad token's embedding row gets nothing from the embedding side (padding_idx).
    assert embedding.padding_idx is not None


def test_embedding_without_the_lm_head_gets_its_ordinary_gradient() -> None:
    model = load_policy("tiny", seed=0)[0].train()
    assert accumulate_tied_embedding_grad(model)
    embedding = model.get_input_embeddings()
    ids = torch.tensor([[5, 6, 5]])
    embedding(ids).pow(2).sum().backward()
    expected = torch.zeros_like(embedding.weight)
    expected[5] = 4 * embedding.weight[5].detach()
    expected[6] = 2 * embedding.weight[6].detach()
    torch.testing.assert_close(embedding.weight.grad, expected)


def test_a_deep_copy_uses_its_own_weight_and_untied_models_are_left_alone() -> None:
    model = load_policy("tiny", seed=0)[0]
    assert accumulate_tied_embedding_grad(model)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.get_input_embeddings().weight.zero_()
    ids = torch.tensor([[5, 6]])
    assert twin.get_input_embeddings()(ids).abs().sum() == 0
    assert model.get_input_embeddings()(ids).abs().sum() > 0
    model.config.tie_word_embeddings = False
    untied = type(model)(model.config)
    assert untied.get_output_embeddings().weight is not untied.get_input_embeddings().weight
    assert not accumulate_tied_embedding_grad(untied)
