"""GRPO losses against values computed by hand."""

import math

import pytest

torch = pytest.importorskip("torch")

from services.trainer.grpo import (
    grpo_loss,
    is_weights,
    k3_kl,
    linear_selective_log_softmax,
    selective_log_softmax,
)


def test_selective_log_softmax_equals_gathered_log_softmax_in_chunks():
    logits = torch.randn(3, 5, 11, dtype=torch.float64)
    ids = torch.randint(0, 11, (3, 5))
    expected = torch.log_softmax(logits, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(selective_log_softmax(logits, ids, chunk_rows=4).double(), expected, atol=1e-6)


def test_k3_is_zero_at_equality_and_matches_the_formula():
    logp = torch.tensor([-1.0, -2.0])
    ref = torch.tensor([-1.0, -1.5])
    kl = k3_kl(logp, ref)
    assert kl[0] == 0.0
    assert kl[1].item() == pytest.approx(math.exp(0.5) - 0.5 - 1.0)


def test_grpo_on_policy_is_minus_the_mean_advantage_per_sequence():
    # ratio = 1, no KL: per token loss = -A; per-sequence mean, then mean over sequences.
    logp = torch.tensor([[-1.0, -2.0, -3.0], [0.0, -1.0, -1.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 1], [0, 1, 1]])
    terms = grpo_loss(logp, mask, torch.tensor([2.0, -1.0]), beta=0.0)
    assert terms.loss.item() == pytest.approx(-(2.0 + -1.0) / 2)
    terms.loss.backward()
    # d/dlogp of -A * exp(logp - sg(logp)) / |y| / N = -A / |y| / N on real tokens, 0 on padding.
    assert logp.grad.flatten().tolist() == pytest.approx([-1 / 3, -1 / 3, -1 / 3, 0.0, 0.25, 0.25])
    assert terms.tokens.item() == 5


def test_ppo_clipping_with_old_log_probs():
    logp = torch.log(torch.tensor([[1.5, 0.5]]))  # ratio 1.5 and 0.5 against old log-probs of 0
    old = torch.zeros(1, 2)
    mask = torch.ones(1, 2)
    positive = grpo_loss(logp, mask, torch.tensor([1.0]), old_logp=old, beta=0.0, clip_eps=0.2)
    # A > 0: min(1.5, 1.2) = 1.2 and min(0.5, 0.8) = 0.5 -> loss = -(1.2 + 0.5) / 2
    assert positive.loss.item() == pytest.approx(-0.85)
    assert positive.clipped_tokens.item() == 1
    negative = grpo_loss(
        logp, mask, torch.tensor([-1.0]), old_logp=old, beta=0.0, clip_eps=0.2, clip_eps_high=0.3
    )
    # A < 0: min(-1.5, -1.3) = -1.5 and min(-0.5, -0.8) = -0.8 -> loss = (1.5 + 0.8) / 2
    assert negative.loss.item() == pytest.approx(1.15)
    assert negative.clipped_tokens.item() == 1


def test_kl_term_and_report():
    logp = torch.tensor([[-1.0, -1.0]])
    ref = torch.tensor([[-1.0, -2.0]])
    terms = grpo_loss(logp, torch.ones(1, 2), torch.tensor([0.0]), ref_logp=ref, beta=0.5)
    k = math.exp(-1.0) + 1.0 - 1.0
    assert terms.kl_sum.item() == pytest.approx(k / 2)
    assert terms.loss.item() == pytest.approx(0.5 * k / 2)


def test_dr_grpo_divides_by_a_constant_and_weights_scale_items():
    logp = torch.zeros(2, 4)
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    terms = grpo_loss(
        logp,
        mask,
        torch.tensor([1.0, 1.0]),
        loss_type="dr_grpo",
        beta=0.0,
        max_length=8,
        weights=torch.tensor([1.0, 0.5]),
        num_sequences=4,
    )
    # sum over tokens / 8, weighted, / N=4: (-(4/8) * 1 - (2/8) * 0.5) / 4
    assert terms.loss.item() == pytest.approx((-0.5 - 0.125) / 4)


def test_legacy_is_reward_weighted_nll():
    logp = torch.tensor([[-1.0, -3.0]], requires_grad=True)
    terms = grpo_loss(logp, torch.ones(1, 2), torch.tensor([2.0]), loss_type="legacy", beta=0.0)
    assert terms.loss.item() == pytest.approx(-2.0 * (-1.0 - 3.0) / 2)
    terms.loss.backward()
    assert logp.grad.flatten().tolist() == pytest.approx([-1.0, -1.0])


def test_is_weights_are_old_over_sampler_truncated_at_the_cap_without_gradient():
    old = torch.tensor([[-1.0, -2.0, -0.5, -4.0]], requires_grad=True)
    sampler = torch.tensor([[-1.0, -1.0, -3.0, -4.5]])
    rho = is_weights(old, sampler, cap=2.0)
    # exp(0) = 1; exp(-1) kept below 1; exp(2.5) = 12.2 cut to 2; exp(0.5) = 1.65 under the cap
    assert rho.flatten().tolist() == pytest.approx([1.0, math.exp(-1.0), 2.0, math.exp(0.5)])
    assert not rho.requires_grad


def test_sampler_log_probs_weight_the_policy_term_but_not_the_kl():
    # on-policy ratio 1 (no old): l_t = -(rho_t * A - beta * kl_t); two tokens, rho = [2 (cut from e^3), e^-1]
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, -2.0]])
    sampler = torch.tensor([[-4.0, -1.0]])
    terms = grpo_loss(
        logp, torch.ones(1, 2), torch.tensor([1.5]), sampler_logp=sampler, ref_logp=ref, beta=0.1, is_cap=2.0
    )
    rho = [2.0, math.exp(-1.0)]
    kl = [math.exp(-0.5) + 0.5 - 1.0, 0.0]
    expected = sum(-(r * 1.5 - 0.1 * k) for r, k in zip(rho, kl, strict=True)) / 2
    assert terms.loss.item() == pytest.approx(expected)
    assert terms.truncated_tokens.item() == 1
    assert terms.is_weight_sum.item() == pytest.approx(sum(rho))
    terms.loss.backward()
    # d/dlogp_t of -rho_t * A * exp(logp - sg(logp)) / 2 = -rho_t * A / 2 (plus the KL's own gradient)
    dkl = [0.1 * (1.0 - math.exp(-0.5)) / 2, 0.0]
    assert logp.grad.flatten().tolist() == pytest.approx(
        [-r * 1.5 / 2 + d for r, d in zip(rho, dkl, strict=True)]
    )


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "legacy"])
def test_sampler_log_probs_equal_to_the_old_policy_change_nothing(loss_type):
    logp = torch.tensor([[-1.0, -2.0, -0.3], [-0.7, -0.2, -2.2]], requires_grad=True)
    mask = torch.tensor([[1, 1, 1], [0, 1, 1]])
    adv = torch.tensor([1.0, -0.5])
    plain = grpo_loss(logp, mask, adv, loss_type=loss_type, beta=0.0)
    (plain_grad,) = torch.autograd.grad(plain.loss, logp)
    same = grpo_loss(logp, mask, adv, loss_type=loss_type, beta=0.0, sampler_logp=logp.detach(), is_cap=1.0)
    (same_grad,) = torch.autograd.grad(same.loss, logp)
    assert same.loss.item() == pytest.approx(plain.loss.item())
    assert torch.equal(same_grad, plain_grad)
    assert same.truncated_tokens.item() == 0 and same.is_weight_sum.item() == pytest.approx(5.0)


def test_unknown_loss_type_names_the_field():
    with pytest.raises(ValueError, match=r"loss.type"):
        grpo_loss(torch.zeros(1, 1), torch.ones(1, 1), torch.zeros(1), loss_type="ppo")


def test_linear_selective_log_softmax_matches_float64_reference_and_its_gradient():
    torch.manual_seed(0)
    hidden = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 5, dtype=torch.float64)
    targets = torch.randint(0, 11, (7,))
    # a chunk size that does not divide the rows exercises the last, short chunk
    fused = linear_selective_log_softmax(hidden, weight, targets, chunk_rows=3)
    reference = torch.log_softmax(hidden @ weight.T, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(fused.double(), reference, atol=1e-6)
    upstream = torch.randn(7, dtype=torch.float64)
    (grad_fused,) = torch.autograd.grad((fused.double() * upstream).sum(), hidden)
    (grad_reference,) = torch.autograd.grad((reference * upstream).sum(), hidden)
    assert torch.allclose(grad_fused, grad_reference, atol=1e-6)
