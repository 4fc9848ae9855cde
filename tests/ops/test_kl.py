from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from alignkit.errors import CheckpointError
from alignkit.ops.kl import (
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    apply_kl_penalty,
    available_kl_estimators,
    full_kl,
    kl_estimate,
    kl_loss,
    kl_loss_weights,
    register_kl_estimator,
)


def _exact_kl(pi: torch.Tensor, ref: torch.Tensor) -> float:
    return float((pi * (pi.log() - ref.log())).sum())


def _sampled_estimates(pi: torch.Tensor, ref: torch.Tensor, kind: str, n: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.multinomial(pi, n, replacement=True, generator=generator)
    return kl_estimate(pi.log()[tokens], ref.log()[tokens], kind).double()


# --- estimators -----------------------------------------------------------------------------


def test_estimators_on_a_hand_example():
    logp = torch.tensor([math.log(0.5)])
    ref_logp = torch.tensor([math.log(0.25)])
    r = math.log(2.0)  # logp - ref_logp
    expected = {"k1": r, "abs": r, "k2": 0.5 * r * r, "k3": 0.5 - math.log(0.5) - 1.0}
    for kind, value in expected.items():
        assert kl_estimate(logp, ref_logp, kind).item() == pytest.approx(value, rel=1e-6)
    # Policy less likely than the reference: k1 is negative for this single token, abs is not.
    assert kl_estimate(ref_logp, logp, "k1").item() == pytest.approx(-r, rel=1e-6)
    assert kl_estimate(ref_logp, logp, "abs").item() == pytest.approx(r, rel=1e-6)
    assert kl_estimate(ref_logp, logp, "k3").item() == pytest.approx(2.0 - r - 1.0, rel=1e-6)


def test_verl_aliases_map_to_the_same_estimators():
    logp, ref_logp = torch.randn(4, 7), torch.randn(4, 7)
    for alias, name in [("kl", "k1"), ("mse", "k2"), ("low_var_kl", "k3")]:
        torch.testing.assert_close(
            kl_estimate(logp, ref_logp, alias), kl_estimate(logp, ref_logp, name)
        )
    assert available_kl_estimators() == {
        "k1": ("kl",),
        "abs": (),
        "k2": ("mse",),
        "k3": ("low_var_kl",),
    }


def test_unknown_kind_lists_valid_kinds_and_points_full_to_full_kl():
    with pytest.raises(ValueError, match=r"valid: k1 \(alias kl\), abs, k2 \(alias mse\)"):
        kl_estimate(torch.zeros(2), torch.zeros(2), "k4")
    with pytest.raises(ValueError, match="Did you mean 'low_var_kl'"):
        kl_estimate(torch.zeros(2), torch.zeros(2), "low_var")
    with pytest.raises(ValueError, match="full_kl"):
        kl_estimate(torch.zeros(2), torch.zeros(2), "full")


def test_registering_an_estimator_needs_no_other_edit():
    @register_kl_estimator("squared_ratio_minus_one", aliases=("srm1",))
    def _estimator(log_ratio):
        return log_ratio.exp() - 1

    try:
        logp, ref_logp = torch.tensor([0.0]), torch.tensor([-1.0])
        assert kl_estimate(logp, ref_logp, "srm1").item() == pytest.approx(math.e - 1, rel=1e-6)
        with pytest.raises(ValueError, match="already registered"):
            register_kl_estimator("k1")(_estimator)
    finally:
        KL_ESTIMATORS.unregister("squared_ratio_minus_one")
    assert "srm1" not in KL_ESTIMATORS


def test_half_precision_inputs_are_computed_in_float32():
    logp = torch.tensor([-0.1, -2.0], dtype=torch.bfloat16)
    ref_logp = torch.tensor([-0.3, -1.0], dtype=torch.bfloat16)
    for kind in ("k1", "abs", "k2", "k3"):
        assert kl_estimate(logp, ref_logp, kind).dtype == torch.float32


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_k1_and_k3_expectations_under_the_policy_equal_the_exact_kl(seed):
    torch.manual_seed(seed)
    # Logit scale 0.5 keeps ref/pi below e^2.6, where k3 would reach its clamp at 10.
    pi = torch.softmax(0.5 * torch.randn(11, dtype=torch.float64), 0)
    ref = torch.softmax(0.5 * torch.randn(11, dtype=torch.float64), 0)
    assert kl_estimate(pi.log(), ref.log(), "k3").max() < 10
    for kind in ("k1", "k3"):
        expectation = float((pi * kl_estimate(pi.log(), ref.log(), kind)).sum())
        assert expectation == pytest.approx(_exact_kl(pi, ref), rel=1e-10)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_k1_and_k3_are_unbiased_in_monte_carlo_from_policy_samples(seed):
    torch.manual_seed(seed)
    pi = torch.softmax(0.5 * torch.randn(8), 0)
    ref = torch.softmax(0.5 * torch.randn(8), 0)
    true_kl = _exact_kl(pi.double(), ref.double())
    n = 200_000
    for kind in ("k1", "k3"):
        estimates = _sampled_estimates(pi, ref, kind, n, seed)
        assert estimates.max() < 10  # the clamp never binds here, so no bias from it
        standard_error = float(estimates.std()) / math.sqrt(n)
        assert abs(float(estimates.mean()) - true_kl) < 4 * standard_error
    # k3 reaches that mean with less spread than k1 when pi and ref are close (its selling point).
    close_ref = torch.softmax(pi.log() + 0.1 * torch.randn(8), 0)
    spread = {
        k: float(_sampled_estimates(pi, close_ref, k, 20_000, seed).std()) for k in ("k1", "k3")
    }
    assert spread["k3"] < spread["k1"]


def test_k2_is_biased_beyond_monte_carlo_error():
    pi = torch.tensor([0.9, 0.1])
    ref = torch.tensor([0.1, 0.9])
    true_kl = _exact_kl(pi.double(), ref.double())  # 0.8 * log 9 = 1.758
    n = 100_000
    estimates = _sampled_estimates(pi, ref, "k2", n, seed=0)
    standard_error = float(estimates.std()) / math.sqrt(n)
    # Every token has |log ratio| = log 9, so E[k2] = 0.5 * log(9)^2 = 2.414, not the KL.
    assert float(estimates.mean()) == pytest.approx(0.5 * math.log(9) ** 2, rel=1e-5)
    assert abs(float(estimates.mean()) - true_kl) > 100 * max(standard_error, 1e-6)


finite_logps = st.floats(min_value=-60.0, max_value=0.0, width=32)


@settings(max_examples=300, deadline=None)
@given(logp=finite_logps, ref_logp=finite_logps, tiny=st.floats(-1e-3, 1e-3))
def test_k3_is_non_negative_and_bounded(logp, ref_logp, tiny):
    pairs = torch.tensor([[logp, ref_logp], [0.0, tiny], [logp, logp + tiny], [logp, logp]])
    values = kl_estimate(pairs[:, 0], pairs[:, 1], "k3")
    # The closed form in float64: exp(x) - x - 1 with x = ref_logp - logp, capped at 10.
    x = (pairs[:, 1] - pairs[:, 0]).double()
    expected = (torch.exp(x) - x - 1).clamp(max=10.0)
    torch.testing.assert_close(values.double(), expected, rtol=1e-5, atol=1e-6)
    assert torch.all(values >= 0)


def test_k3_does_not_round_below_zero_for_tiny_log_ratios():
    # exp(x) - x - 1 computed naively in float32 gives about -6e-8 for many |x| < 1e-3.
    tiny = torch.linspace(-1e-3, 1e-3, 20_001)
    assert (kl_estimate(torch.zeros_like(tiny), tiny, "k3") >= 0).all()


def test_k3_clamp_at_ten_and_infinite_inputs_stay_finite():
    logp = torch.tensor([-8.0, 0.0, -1.0, -1.0])
    ref_logp = torch.tensor([0.0, -40.0, -torch.inf, 1e-3 - 1.0])
    values = kl_estimate(logp, ref_logp, "k3")
    # exp(8) - 8 - 1 > 10 and 40 - 1 > 10: both clamped; a reference of -inf gives the clamp too.
    torch.testing.assert_close(values[:3], torch.tensor([10.0, 10.0, 10.0]))
    assert values[3].item() == pytest.approx(math.expm1(1e-3) - 1e-3, rel=1e-3)


# --- exact KL -------------------------------------------------------------------------------


def test_full_kl_matches_a_closed_form():
    logits = torch.tensor([0.0, math.log(3.0)])  # pi = (1/4, 3/4)
    ref_logits = torch.tensor([0.0, 0.0])  # ref = (1/2, 1/2)
    expected = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    assert full_kl(logits, ref_logits).item() == pytest.approx(expected, rel=1e-6)
    assert full_kl(ref_logits, ref_logits).item() == 0.0


def test_full_kl_matches_torch_distributions_over_batches_and_chunks():
    logits = torch.randn(3, 5, 50, dtype=torch.float64)
    ref_logits = torch.randn(3, 5, 50, dtype=torch.float64)
    expected = torch.distributions.kl_divergence(
        torch.distributions.Categorical(logits=logits),
        torch.distributions.Categorical(logits=ref_logits),
    )
    result = full_kl(logits, ref_logits)
    assert result.shape == (3, 5)
    torch.testing.assert_close(result, expected)
    torch.testing.assert_close(full_kl(logits, ref_logits, chunk_size=2), expected)
    assert full_kl(logits.bfloat16(), ref_logits.bfloat16()).dtype == torch.float32


def test_full_kl_with_masked_vocabulary_entries():
    logits = torch.tensor([[0.0, 0.0, -torch.inf], [0.0, 0.0, 0.0]], requires_grad=True)
    ref_logits = torch.tensor([[0.0, -torch.inf, 0.0], [0.0, 0.0, -torch.inf]])
    result = full_kl(logits, ref_logits)
    # Row 0: pi puts 1/2 on a token ref cannot emit -> infinite KL; row 1 likewise.
    assert torch.isinf(result).all()
    finite_ref = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    value = full_kl(logits, finite_ref)
    expected_row0 = 0.5 * math.log(0.5 / (1 / (2 + math.e))) + 0.5 * math.log(
        0.5 / (math.e / (2 + math.e))
    )
    assert value[0].item() == pytest.approx(expected_row0, rel=1e-6)
    value.sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_full_kl_gradient_matches_finite_differences():
    logits = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    ref_logits = torch.randn(2, 6, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: full_kl(x, ref_logits), (logits,))


def test_full_kl_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="differ"):
        full_kl(torch.zeros(2, 3), torch.zeros(2, 4))


# --- penalty --------------------------------------------------------------------------------


def test_apply_kl_penalty_on_a_hand_example():
    token_scores = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    ref_logp = torch.tensor([[-1.0, -1.0, -1.0, -1.0]])
    logp = ref_logp + torch.tensor([[0.1, -0.2, 0.3, 5.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    rewards, kl = apply_kl_penalty(token_scores, logp, ref_logp, mask, coef=0.5, kind="k1")
    torch.testing.assert_close(kl, torch.tensor([[0.1, -0.2, 0.3, 0.0]]))
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.1, 0.85, 0.0]]))

    rewards3, kl3 = apply_kl_penalty(token_scores, logp, ref_logp, mask, coef=0.5, kind="k3")
    k3 = [math.exp(-d) + d - 1 for d in (0.1, -0.2, 0.3)]
    torch.testing.assert_close(kl3, torch.tensor([[*k3, 0.0]]))
    torch.testing.assert_close(
        rewards3, torch.tensor([[-0.5 * k3[0], -0.5 * k3[1], 1.0 - 0.5 * k3[2], 0.0]])
    )


def test_apply_kl_penalty_ignores_whatever_is_at_masked_positions():
    mask = torch.tensor([[0, 1, 1], [1, 1, 0]])
    scores = torch.tensor([[torch.nan, 0.0, 1.0], [0.0, 2.0, torch.inf]])
    logp = torch.tensor([[torch.nan, -1.0, -2.0], [-0.5, -0.7, torch.nan]])
    ref_logp = torch.tensor([[-torch.inf, -1.5, -1.0], [-0.4, -0.9, 3.0]])
    rewards, kl = apply_kl_penalty(scores, logp, ref_logp, mask, torch.tensor(0.1), "k2")
    assert torch.isfinite(rewards).all() and torch.isfinite(kl).all()
    assert rewards[0, 0] == 0 and rewards[1, 2] == 0 and kl[0, 0] == 0 and kl[1, 2] == 0
    assert rewards[1, 1].item() == pytest.approx(2.0 - 0.1 * 0.5 * 0.2**2, rel=1e-5)


# --- controllers ----------------------------------------------------------------------------


def test_fixed_controller_never_moves():
    controller = FixedKLController(0.05)
    for kl in (0.0, 10.0, 1e6):
        assert controller.update(kl, n_steps=64) == 0.05
    assert controller.value == 0.05
    restored = FixedKLController(1.0)
    restored.load_state_dict(controller.state_dict())
    assert restored.value == 0.05


def test_proportional_controller_over_a_scripted_kl_sequence():
    controller = AdaptiveKLController(init_coef=0.2, target=6.0, horizon=10_000)
    n_steps = 256  # each step: factor 1 + clip(kl/6 - 1, -0.2, 0.2) * 256 / 10000
    expected = 0.2
    for kl, factor in [
        (12.0, 1.00512),  # error +1 clipped to +0.2
        (6.0, 1.0),  # on target
        (0.0, 0.99488),  # error -1 clipped to -0.2
        (6.6, 1.00256),  # error +0.1
        (5.4, 0.99744),  # error -0.1
        (3.0, 0.99488),  # error -0.5 clipped
    ]:
        expected *= factor
        assert controller.update(kl, n_steps) == pytest.approx(expected, rel=1e-12)
    assert controller.value == pytest.approx(0.2 * 1.00512 * 0.99488**2 * 1.00256 * 0.99744)


def test_multiplicative_controller_follows_seed_002():
    controller = AdaptiveKLController(1.0, target=1.0, horizon=1, rule="multiplicative")
    script = [(2.0, 1.5), (1.2, 1.5), (0.4, 0.75), (1.5, 0.75), (0.5, 0.75), (10.0, 1.125)]
    for kl, expected in script:  # x1.5 above 1.5*target, x0.5 below 0.5*target, strictly
        assert controller.update(kl, n_steps=32) == pytest.approx(expected, rel=1e-15)


def test_adaptive_controller_state_round_trip_reproduces_the_run():
    first = AdaptiveKLController(0.1, target=0.5, horizon=100)
    for kl in (1.0, 0.2):
        first.update(kl, n_steps=8)
    resumed = AdaptiveKLController(0.1, target=0.5, horizon=100)
    resumed.load_state_dict(first.state_dict())
    for kl in (0.7, 0.0, 3.0):
        assert resumed.update(kl, 8) == first.update(kl, 8)
    with pytest.raises(CheckpointError, match="value"):
        resumed.load_state_dict({"coef": 1.0})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rule": "pid"}, "unknown KL controller rule"),
        ({"target": 0.0}, "target KL"),
        ({"horizon": 0.0}, "horizon"),
        ({"init_coef": -1.0}, "initial KL coefficient"),
    ],
)
def test_adaptive_controller_rejects_bad_settings(kwargs, message):
    settings_ = {"init_coef": 0.1, "target": 1.0, "horizon": 10.0, **kwargs}
    with pytest.raises(ValueError, match=message):
        AdaptiveKLController(**settings_)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_kl_ops_give_the_same_results_on_cuda():
    logits, ref_logits = torch.randn(4, 6, 300), torch.randn(4, 6, 300)
    torch.testing.assert_close(
        full_kl(logits, ref_logits), full_kl(logits.cuda(), ref_logits.cuda()).cpu()
    )
    logp, ref_logp, mask = torch.randn(4, 6), torch.randn(4, 6), torch.ones(4, 6)
    for kind in ("k1", "abs", "k2", "k3"):
        cpu = apply_kl_penalty(torch.ones(4, 6), logp, ref_logp, mask, 0.1, kind)
        gpu = apply_kl_penalty(
            torch.ones(4, 6).cuda(), logp.cuda(), ref_logp.cuda(), mask.cuda(), 0.1, kind
        )
        for a, b in zip(cpu, gpu, strict=True):
            torch.testing.assert_close(a, b.cpu())


# --- KL as a loss: exact expected gradients ---------------------------------------------------


def _expected_loss_gradient(estimator: str, logits: torch.Tensor, ref_logp: torch.Tensor):
    """E_{y ~ pi}[grad kl_loss(log pi(y), log ref(y))], exactly: sum_y pi(y) (detached) * grad."""
    logits = logits.clone().requires_grad_()
    logp = torch.log_softmax(logits, -1)
    weights = logp.detach().exp()  # pi as the sampling weight, not differentiated
    (weights * kl_loss(logp, ref_logp, estimator)).sum().backward()
    return logits.grad


def _kl_gradients(logits: torch.Tensor, ref_logp: torch.Tensor):
    """grad KL(pi||ref) and grad KL(ref||pi) with respect to the policy logits, by autograd."""
    logits = logits.clone().requires_grad_()
    logp = torch.log_softmax(logits, -1)
    reverse = torch.autograd.grad((logp.exp() * (logp - ref_logp)).sum(), logits)[0]
    logits = logits.detach().requires_grad_()
    logp = torch.log_softmax(logits, -1)
    forward = torch.autograd.grad((ref_logp.exp() * (ref_logp - logp)).sum(), logits)[0]
    return reverse, forward


@pytest.mark.parametrize("seed", [1, 2])
def test_kl_loss_expected_gradients_match_the_documented_divergences(seed):
    generator = torch.Generator().manual_seed(seed)
    logits = 1.5 * torch.randn(6, dtype=torch.float64, generator=generator)
    ref_logp = torch.log_softmax(torch.randn(6, dtype=torch.float64, generator=generator), -1)
    # k3's clamp at 10 (ref/pi > ~13.6) must not bind here, or its gradient is cut there.
    assert (ref_logp - torch.log_softmax(logits, -1)).max() < 2.4
    reverse, forward = _kl_gradients(logits, ref_logp)
    assert reverse.abs().max() > 0.05 and (reverse - forward).abs().max() > 0.05  # distinct
    expected = {"k1": torch.zeros(6, dtype=torch.float64), "k2": reverse, "k3": forward}
    expected.update({"k1+": reverse, "k3+": reverse, "low_var_kl+": reverse, "mse": reverse})
    for estimator, gradient in expected.items():
        torch.testing.assert_close(
            _expected_loss_gradient(estimator, logits, ref_logp), gradient, atol=1e-6, rtol=0
        )


def test_kl_loss_values_equal_the_estimates_and_ref_gets_no_gradient():
    generator = torch.Generator().manual_seed(3)
    logp = torch.randn(4, 5, dtype=torch.float64, generator=generator).requires_grad_()
    ref_logp = torch.randn(4, 5, dtype=torch.float64, generator=generator).requires_grad_()
    for estimator, base in [("k1", "k1"), ("k2", "k2"), ("k3", "k3"), ("k1+", "k1"), ("k3+", "k3")]:
        torch.testing.assert_close(
            kl_loss(logp, ref_logp, estimator), kl_estimate(logp, ref_logp, base).detach()
        )
    kl_loss(logp, ref_logp, "k3+").sum().backward()
    assert ref_logp.grad is None
    torch.testing.assert_close(logp.grad, (logp - ref_logp).detach())  # k2's gradient: d
    with pytest.raises(ValueError, match=r"'k33\+'.*Did you mean 'k3'"):
        kl_loss(logp, ref_logp, "k33+")


def test_full_kl_gradcheck_in_both_inputs_with_blocks():
    logits = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    ref_logits = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, r: full_kl(x, r, chunk_size=2), (logits, ref_logits))


def test_full_kl_backward_keeps_no_float32_copy_of_the_logits():
    from tests.ops.test_logprobs import peak_allocated_bytes

    vocab = 32768
    base = torch.randn(64, vocab).to(torch.bfloat16)
    ref_logits = torch.randn(64, vocab).to(torch.bfloat16)

    def naive(z, r):
        logp, ref_logp = torch.log_softmax(z.float(), -1), torch.log_softmax(r.float(), -1)
        return (logp.exp() * (logp - ref_logp)).sum(-1)

    def forward_backward(fn):
        logits = base.clone().requires_grad_()
        fn(logits, ref_logits).sum().backward()

    naive_peak = peak_allocated_bytes(lambda: forward_backward(naive))
    chunked_peak = peak_allocated_bytes(
        lambda: forward_backward(lambda z, r: full_kl(z, r, chunk_size=4))
    )
    bf16_size = base.numel() * 2
    float32_block = 4 * vocab * 4
    # Ours: the leaf and its bf16 gradient plus a few float32 blocks of 4 rows (an upcast,
    # two log-softmaxes, p; measured 9.6 MiB). Naive: several float32 [64, V] activations kept
    # for backward, and their gradients (measured 44 MiB).
    assert chunked_peak < 2 * bf16_size + 5 * float32_block
    assert naive_peak > 4 * chunked_peak


# --- the KL loss on samples of an older policy --------------------------------------------


def test_kl_loss_weights_are_the_detached_ratio_times_the_behaviour_weights():
    logp = torch.tensor([-1.0, -2.0, -0.5, -30.0], requires_grad=True)
    old = torch.tensor([-1.5, -2.0, -0.1, 0.0])
    weights = kl_loss_weights(logp, old)
    torch.testing.assert_close(weights, (logp - old).exp().clamp(max=math.exp(20.0)).detach())
    assert not weights.requires_grad
    behaviour = torch.tensor([0.5, 2.0, 1.0, 1.0])
    torch.testing.assert_close(kl_loss_weights(logp, old, behaviour), weights * behaviour)
    assert kl_loss_weights(torch.tensor([50.0]), torch.tensor([0.0])).item() == pytest.approx(
        math.exp(20.0)
    )


@pytest.mark.parametrize("estimator", ["k2", "k1+", "k3+"])
def test_weighted_kl_loss_on_old_samples_has_the_reverse_kl_gradient(estimator):
    # Exact expectation over a 5-token vocabulary: tokens drawn from pi_old, each token's KL
    # loss weighted by pi/pi_old, has the gradient of KL(pi || ref) of the current pi.
    generator = torch.Generator().manual_seed(6)
    theta = torch.randn(5, generator=generator, dtype=torch.float64, requires_grad=True)
    old_logp = torch.log_softmax(torch.randn(5, generator=generator, dtype=torch.float64), 0)
    ref_logp = torch.log_softmax(torch.randn(5, generator=generator, dtype=torch.float64), 0)
    logp = torch.log_softmax(theta, 0)
    per_token = kl_loss(logp, ref_logp, estimator) * kl_loss_weights(logp, old_logp)
    (weighted,) = torch.autograd.grad((old_logp.exp() * per_token).sum(), theta)
    logp = torch.log_softmax(theta, 0)
    (want,) = torch.autograd.grad((logp.exp() * (logp - ref_logp)).sum(), theta)
    torch.testing.assert_close(weighted, want)
    # Unweighted, the same samples give another gradient.
    logp = torch.log_softmax(theta, 0)
    (unweighted,) = torch.autograd.grad(
        (old_logp.exp() * kl_loss(logp, ref_logp, estimator)).sum(), theta
    )
    assert (unweighted - want).abs().max() > 1e-3
