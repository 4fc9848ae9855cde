"""The distribution a decoder draws each token from, and the draw itself.

:func:`sampling_distribution` turns next-token logits into the log-probs tokens are drawn from
(temperature, then top-k, then top-p, renormalised: the order of transformers' default logits
warpers and of vLLM's sampler; :func:`truncate_logits` gives its kept set);
:func:`inverse_cdf_sample` draws one token per row from such log-probs with uniforms from a
``torch.Generator``. Behaviour log-probs recorded by an engine
are read from the same ``[R, V]`` tensor the token was drawn from, so they are exactly the
log-probs of the distribution sampled. bfloat16 logits (a bf16 decode) are upcast first: the
log-softmax, the top-p mass, the cumulative sum drawn from and the recorded log-prob are float32.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["inverse_cdf_sample", "sampling_distribution", "truncate_logits"]


def sampling_distribution(
    logits: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
) -> Tensor:
    """``[R, V]`` float32 log-probs of the distribution tokens are drawn from.

    ``log softmax(z / T)`` restricted to the kept set of :func:`truncate_logits` (top-k, then
    top-p) and renormalised over it. Any ``-inf`` already in ``logits`` (e.g. a suppressed EOS)
    stays ``-inf``. Greedy decoding (T = 0) is not a distribution: take the argmax instead.
    """
    if not temperature > 0:
        raise ValueError(
            f"temperature must be > 0 (greedy decoding is an argmax), got {temperature}"
        )
    scaled = logits.float()
    if temperature != 1.0:  # x / 1 == x: skip a pass over [R, V]
        scaled = scaled / temperature
    return truncate_logits(scaled, top_k, top_p).log_softmax(dim=-1)


def truncate_logits(scaled: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """``[..., V]`` temperature-scaled logits with the tokens a truncated sampler never draws set
    to ``-inf`` (a new tensor; unchanged when both are off).

    - top-k (Fan et al. 2018, "Hierarchical Neural Story Generation"): the k largest scaled
      logits are kept (ties with the k-th are kept too); ``top_k = 0`` or ``>= V`` is off;
    - then top-p (Holtzman et al. 2020, "The Curious Case of Neural Text Degeneration"), on
      the top-k distribution: tokens in decreasing probability are kept while the mass strictly
      before them is below p, so the smallest set whose mass reaches p is kept (the token
      crossing p included; the most likely token always); ``top_p = 1`` is off.

    The order of transformers' default logits warpers and of vLLM's sampler. A log-softmax of
    the result is the truncated, renormalised distribution (:func:`sampling_distribution`);
    the trainer scores sampled tokens under it to weigh them against a truncated sampler.
    """
    if top_k < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need top_k >= 0 and top_p in (0, 1], got {top_k} and {top_p}")
    if top_k and top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, top_k, dim=-1).values[..., -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(scaled, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Mass strictly before each token: a token is kept while that is below p.
        before = probs.cumsum(dim=-1) - probs
        remove = before >= top_p
        remove[..., 0] = False
        scaled = scaled.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    return scaled


def inverse_cdf_sample(logprobs: Tensor, generator: torch.Generator) -> Tensor:
    """``[R]`` one token per row of ``[R, V]`` log-probs, by inverse-CDF sampling.

    With ``c_i = sum_{j <= i} p_j`` and one uniform ``u ~ U[0, 1)`` per row, the token is the
    first i with ``c_i > u * c_V`` (scaling by the total makes float rounding of the sum
    harmless), so ``P(i) = p_i / c_V``; a token of probability 0 is never drawn (``u * c_V`` is
    kept below ``c_V``). One
    ``torch.rand(R)`` call per draw: the generator advances by R uniforms whatever V is.
    Uniforms are drawn on the generator's device and moved, so a CPU generator drives a GPU
    model and the same seed gives the same tokens wherever the model lives.
    """
    cdf = logprobs.exp().cumsum(dim=-1)
    u = torch.rand(logprobs.shape[0], 1, generator=generator, device=generator.device)
    total = cdf[:, -1:]
    # u * total < total also after rounding: the index then stops at the last token with mass.
    x = torch.minimum(
        u.to(device=cdf.device, dtype=cdf.dtype) * total, total.nextafter(total.new_zeros(()))
    )
    return torch.searchsorted(cdf, x, right=True).squeeze(-1)
