"""risk.py against independent computations: brute-force loops, closed forms and limit cases (docs/math.md Sec. 2-5)."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import risk


@pytest.fixture(autouse=True)
def seeded():
    """Every test starts from the same seed, so no test's data depends on which tests ran before it."""
    torch.manual_seed(0)


# ---------------------------------------------------------------- independent references (plain Python floats)


@pytest.fixture
def topk_sizes(monkeypatch):
    """The k of every Tensor.topk call made during the test: how large the partial selections were."""
    sizes, topk = [], torch.Tensor.topk
    monkeypatch.setattr(torch.Tensor, "topk", lambda self, k, *a, **kw: sizes.append(k) or topk(self, k, *a, **kw))
    return sizes


def bf_expectation(v, p):
    return sum(pi * vi for vi, pi in zip(v, p))


def bf_cvar(v, p, level):
    """Walk the atoms from the worst down, taking mass until `level` is used up."""
    left, total = level, 0.0
    for vi, pi in sorted(zip(v, p), key=lambda a: -a[0]):
        take = min(pi, left)
        total += take * vi
        left -= take
        if left <= 0:
            break
    return total / level


def bf_erm(v, p, mu):
    return math.log(sum(pi * math.exp(mu * vi) for vi, pi in zip(v, p))) / mu


def bf_measure(v, p, measure, level):
    return {"expectation": lambda: bf_expectation(v, p), "cvar": lambda: bf_cvar(v, p, level),
            "erm": lambda: bf_erm(v, p, level)}[measure]()


def random_dist(shape, zeros=True, ties=True, dtype=torch.float64):
    v = torch.randn(shape, dtype=dtype)
    if ties:  # round so that equal values appear
        v = (v * 2).round() / 2
    p = torch.rand(shape, dtype=dtype) ** 2
    if zeros:
        p = p * (torch.rand(shape) > 0.3)
        p[..., 0] += 0.05  # keep every row non-empty
    return v, p / p.sum(-1, keepdim=True)


COHERENT = [("expectation", None), ("cvar", 0.05), ("cvar", 0.1), ("cvar", 0.37), ("cvar", 0.5), ("cvar", 0.9),
            ("cvar", 1.0), ("erm", 0.1), ("erm", 1.0), ("erm", 5.0)]


# ---------------------------------------------------------------- Sec. 2: the measures


@pytest.mark.parametrize("measure,level", COHERENT)
def test_measures_match_brute_force_with_ties_and_zero_atoms(measure, level):
    v, p = random_dist((3, 4, 9))
    got = risk.risk_measure(v, p, measure, level)
    assert got.shape == (3, 4)
    for idx in itertools.product(range(3), range(4)):
        want = bf_measure(v[idx].tolist(), p[idx].tolist(), measure, level)
        assert got[idx].item() == pytest.approx(want, abs=1e-10)


def test_cvar_worked_example():
    v = torch.tensor([1.0, 2.0, 5.0, 10.0])
    assert risk.cvar(v, torch.full((4,), 0.25), 0.5).item() == pytest.approx(7.5)


@pytest.mark.parametrize("cvar", [risk.cvar, risk.fast_cvar])
def test_cvar_gradient_at_ties_spreads_the_remainder_in_proportion_to_p(cvar, topk_sizes):
    # worst first: 5 takes 0.25, the two atoms at 2 share the remaining 0.25 of their 0.5: t = 2
    v = torch.tensor([1.0, 2.0, 2.0, 5.0], dtype=torch.float64, requires_grad=True)
    p = torch.full((4,), 0.25, dtype=torch.float64)
    out = cvar(v, p, 0.5)
    assert out.item() == pytest.approx(bf_cvar(v.tolist(), p.tolist(), 0.5)) == pytest.approx(3.5)
    (grad,) = torch.autograd.grad(out, v)
    assert torch.allclose(grad, torch.tensor([0.0, 0.25, 0.25, 0.5], dtype=torch.float64))
    # all values equal (a policy still at its reference): every atom is at the VaR, the gradient is p, as the
    # expectation's, and the training path makes no partial selection of the whole vocabulary
    v = torch.zeros(3, 32000, requires_grad=True)
    p = torch.softmax(torch.randn(3, 32000), -1)
    topk_sizes.clear()
    (grad,) = torch.autograd.grad(cvar(v, p, 0.25).sum(), v)
    assert torch.allclose(grad, p, rtol=1e-5, atol=0)
    assert cvar is risk.cvar or max(topk_sizes) == 1


@pytest.mark.parametrize("cvar", [risk.cvar, risk.fast_cvar])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cvar_with_a_narrow_bulk_and_an_outlier_matches_the_walk(dtype, cvar, topk_sizes):
    """Most values within 1e-6 of each other, one far below: twelve halvings of the spread leave the bulk in one
    interval, so the bisection goes on; the result is still the walk's, and the final selection stays small."""
    g = torch.Generator().manual_seed(3)
    v = 1e-6 * torch.randn(4, 5000, generator=g, dtype=dtype)
    v[:, 0] = -30.0
    p = torch.softmax(torch.randn(4, 5000, generator=g, dtype=dtype), -1)
    got = cvar(v, p, 0.3)
    for row in range(4):
        want = bf_cvar(v[row].double().tolist(), p[row].double().tolist(), 0.3)
        assert got[row].item() == pytest.approx(want, rel=1e-5 if dtype == torch.float32 else 1e-12)
    assert cvar is risk.cvar or max(topk_sizes) <= 2048  # the training path's final selection stays small


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("ties", [False, True])
def test_fast_selections_equal_the_definitions(dtype, ties):
    """The training path's selections (bisection + partial selection; the quantile by partial selection) give the
    definitions' values and gradients: the sort-and-walk CVaR and the authors' torch.quantile form."""
    v, p = random_dist((6, 1000), ties=ties, dtype=dtype)
    for level in (0.01, 0.05, 0.25, 0.5, 0.95):
        for slow, fast, extra in ((risk.cvar, risk.fast_cvar, {}), (risk.cvar_radpo, risk.fast_cvar_radpo, {}),
                                  (risk.cvar_radpo, risk.fast_cvar_radpo, {"split_vocab": True})):
            x = v.clone().requires_grad_(True)
            want, got = slow(x, p, level, **extra), fast(x, p, level, **extra)
            tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(got, want, **tol)
            torch.testing.assert_close(torch.autograd.grad(got.sum(), x)[0], torch.autograd.grad(want.sum(), x)[0],
                                       **tol)


@pytest.mark.parametrize("measure,level", [m for m in COHERENT if m[0] != "expectation"])
def test_bounds_expectation_le_risk_le_max(measure, level):
    v, p = random_dist((50, 7))
    phi = risk.risk_measure(v, p, measure, level)
    e = risk.expectation(v, p)
    vmax = torch.where(p > 0, v, torch.full_like(v, -math.inf)).amax(-1)
    assert torch.all(e <= phi + 1e-12) and torch.all(phi <= vmax + 1e-12)


@pytest.mark.parametrize("measure,level", COHERENT)
def test_translation_equivariance(measure, level):
    v, p = random_dist((20, 6))
    for c in (-3.0, 0.7, 11.0):
        lhs = risk.risk_measure(v + c, p, measure, level)
        assert torch.allclose(lhs, risk.risk_measure(v, p, measure, level) + c, atol=1e-10)


def test_cvar_positive_homogeneity():
    v, p = random_dist((20, 6))
    for lam in (0.5, 2.0, 13.0):
        assert torch.allclose(risk.cvar(lam * v, p, 0.3), lam * risk.cvar(v, p, 0.3), atol=1e-10)


def test_limits_level_one_is_exactly_expectation_and_mu_to_zero():
    v, p = random_dist((10, 8), dtype=torch.float32)
    assert torch.equal(risk.cvar(v, p, 1.0), risk.expectation(v, p))
    v64, p64 = v.double(), p.double() / p.double().sum(-1, keepdim=True)  # fp32 sums are 1 only to ~1e-7
    assert torch.allclose(risk.cvar(v64, p64, 1 - 1e-9), risk.expectation(v64, p64), atol=1e-7)
    assert torch.allclose(risk.erm(v64, p64, 1e-7), risk.expectation(v64, p64), atol=1e-6)


@pytest.mark.parametrize("measure,level", [("expectation", None), ("cvar", 0.3), ("erm", 2.0), ("cvar_radpo", 0.8)])
def test_gradcheck_float64(measure, level):
    v = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)  # continuous: no ties, so CVaR is smooth here
    p = torch.rand(3, 7, dtype=torch.float64)
    p = p / p.sum(-1, keepdim=True)
    assert torch.autograd.gradcheck(lambda x: risk.risk_measure(x, p, measure, level), (v,))


def test_erm_via_log_probs_survives_underflow():
    # p = [e^-200, 1 - e^-200]: exp(-200) is 0 in fp32, yet with mu * v = 500 that atom dominates.
    log_p = torch.tensor([-200.0, 0.0])
    v = torch.tensor([100.0, 0.0])
    want = (300 + math.log1p(math.exp(-300))) / 5  # (1/mu) log(e^{-200 + 500} + e^0)
    assert risk.erm(v, log_probs=log_p, mu=5.0).item() == pytest.approx(want, rel=1e-6)
    assert risk.erm(v, log_p.exp(), 5.0).item() == pytest.approx(0.0, abs=1e-6)  # the probability path loses it


def test_log_probs_equals_probs_for_every_measure():
    v, p = random_dist((5, 6))
    for measure, level in COHERENT + [("cvar_radpo", 0.9)]:
        a = risk.risk_measure(v, p, measure, level)
        b = risk.risk_measure(v, measure=measure, level=level, log_probs=p.log())
        assert torch.allclose(a, b, atol=1e-12), measure


def test_bad_names_and_levels_raise():
    v, p = random_dist((4,))
    with pytest.raises(ValueError, match="choose one of"):
        risk.risk_measure(v, p, "var", 0.5)
    for level in (0.0, 1.5, -0.1, None):
        with pytest.raises(ValueError, match=r"\(0, 1\]"):
            risk.risk_measure(v, p, "cvar", level)
    with pytest.raises(ValueError, match="mu must be > 0"):
        risk.risk_measure(v, p, "erm", 0.0)
    risk.risk_measure(v, p, "expectation", None)  # level ignored
    with pytest.raises(ValueError, match="exactly one"):
        risk.cvar(v, p, 0.5, log_probs=p.log())


def radpo_quantile_transcription(d, p, level, split):
    """The authors' _calculate_cvar, transcribed with torch.quantile (docs/math.md Sec. 2)."""
    if split:
        mid = d.size(-1) // 2
        halves = [(d[..., :mid], p[..., :mid]), (d[..., mid:], p[..., mid:])]
    else:
        halves = [(d, p)]
    out = 0
    for dh, ph in halves:
        var = torch.quantile(dh, 1 - level, dim=-1).unsqueeze(-1)
        out = out + (ph * dh * (dh > var).float()).sum(-1)
    return out


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("level", [0.5, 0.9, 0.95, 0.99])
def test_cvar_radpo_equals_quantile_transcription(split, level):
    d = torch.randn(4, 5, 101)
    p = torch.softmax(torch.randn(4, 5, 101), -1)
    got = risk.cvar_radpo(d, p, level, split_vocab=split)
    assert torch.allclose(got, radpo_quantile_transcription(d, p, level, split), atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 2, 3, 10, 101])
def test_linear_quantile_without_sort_equals_torch_quantile(n, dtype):
    x = (torch.randn(6, n, dtype=dtype) * 2).round() / 2  # ties
    specials = torch.tensor([-0.0, 0.0, 1e-40, -1e-40, -3e38, 3e38], dtype=dtype)
    x[0] = specials[torch.arange(n) % len(specials)]  # signed zeros, subnormals, extremes
    for fraction in [0.0, 0.01, 0.05, 0.3, 0.5, 0.77, 0.95, 0.99, 1.0]:
        assert torch.equal(risk._linear_quantile(x, fraction), torch.quantile(x, fraction, dim=-1)), (n, fraction)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sortable_bits_order_as_the_floats_and_invert(dtype):
    x = torch.cat([torch.randn(500, dtype=dtype) * 10.0 ** torch.randint(-30, 30, (500,)).to(dtype),
                   torch.tensor([-0.0, float("inf"), -float("inf"), 1e-40, -1e-40], dtype=dtype)])
    keys = risk._sortable_bits(x)
    assert not keys.is_floating_point()
    order = keys.argsort(stable=True)
    assert (x[order].diff() >= 0).all()  # non-decreasing: the integers sort the floats
    assert torch.equal(risk._sortable_bits(keys).view(dtype), x)  # and map back exactly


def test_cvar_radpo_is_not_coherent():
    """Why the axiom tests exclude it: no translation equivariance, and it can fall below the expectation."""
    v = torch.tensor([1.0, 2.0, 3.0, 4.0])
    p = torch.full((4,), 0.25)
    assert risk.cvar_radpo(v + 10, p, 0.5).item() != pytest.approx(risk.cvar_radpo(v, p, 0.5).item() + 10)
    assert risk.cvar_radpo(v, p, 0.5).item() < risk.expectation(v, p).item()


# ---------------------------------------------------------------- Sec. 3: nested risk on token trees


def random_tree(k=3, depth=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    costs = [torch.rand((k,) * (t + 1), generator=g, dtype=torch.float64) * 3 for t in range(depth)]
    policies = [torch.softmax(2 * torch.randn((k,) * (t + 1), generator=g, dtype=torch.float64), -1)
                for t in range(depth)]
    return costs, policies


def bf_nested_q(costs, policies, measure, level, prefix, a):
    """Q(s_t, a) by plain recursion over prefixes, with the brute-force measures."""
    t = len(prefix)
    node = tuple(prefix) + (a,)
    c = costs[t][node].item()
    if t == len(costs) - 1:
        return c
    k = costs[0].shape[0]
    nxt = [bf_nested_q(costs, policies, measure, level, node, b) for b in range(k)]
    return c + bf_measure(nxt, policies[t + 1][node].tolist(), measure, level)


@pytest.mark.parametrize("measure,level", [("expectation", None), ("cvar", 0.3), ("cvar", 0.7), ("erm", 1.5)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nested_q_matches_recursion_and_augmented_identity(measure, level, seed):
    costs, policies = random_tree(seed=seed)
    q = risk.nested_q_values(costs, policies, measure, level)
    qaug = risk.augmented_q_values(costs, policies, measure, level)
    before = risk.path_costs_before(costs)
    for t in range(len(costs)):
        for node in itertools.product(range(3), repeat=t + 1):
            want = bf_nested_q(costs, policies, measure, level, node[:-1], node[-1])
            assert q[t][node].item() == pytest.approx(want, abs=1e-10)
            c_before = sum(costs[j][node[: j + 1]].item() for j in range(t))  # C_{1:t-1} along the path
            assert qaug[t][node].item() == pytest.approx(want + c_before, abs=1e-10)
        assert torch.allclose(qaug[t], q[t] + before[t], atol=1e-12)


def test_path_costs_before_stay_on_the_costs_device():
    """On any device (meta here stands in for CUDA: a CPU tensor added to it fails the same way)."""
    costs = [torch.zeros(3, device="meta"), torch.zeros(3, 3, device="meta"), torch.zeros(3, 3, 3, device="meta")]
    before = risk.path_costs_before(costs)
    assert [b.device.type for b in before] == ["meta"] * 3 and [b.shape for b in before] == [c.shape for c in costs]


def test_nested_expectation_equals_expected_return_over_all_paths():
    costs, policies = random_tree(k=3, depth=4, seed=5)
    q = risk.nested_q_values(costs, policies, "expectation")
    value = risk.expectation(q[0], policies[0]).item()
    total = 0.0
    for path in itertools.product(range(3), repeat=4):
        prob = math.prod(policies[t][path[: t + 1]].item() for t in range(4))
        total += prob * sum(costs[t][path[: t + 1]].item() for t in range(4))
    assert value == pytest.approx(total, abs=1e-10)


def test_risk_averse_nested_value_exceeds_expected_cost():
    costs, policies = random_tree(seed=3)
    v = {m: risk.expectation(risk.nested_q_values(costs, policies, m, lv)[0], policies[0]).item()
         for m, lv in [("expectation", None), ("cvar", 0.3), ("erm", 2.0)]}
    assert v["cvar"] > v["expectation"] and v["erm"] > v["expectation"]


# ---------------------------------------------------------------- closed forms (Sec. 3)


def kl(p, q):
    return (p * (p.log() - q.log())).sum(-1)


def test_closed_form_beats_random_feasible_distributions():
    """argmax_p E_p[Q] - beta KL(p || pi_ref) = pi_ref exp(Q / beta) / Z, and its value is
    beta log E_ref[exp(Q / beta)], i.e. risk.erm of Q under pi_ref at mu = 1 / beta (the Gibbs variational principle
    behind Ra-DPO Eq. 11-12)."""
    g = torch.Generator().manual_seed(1)
    q_vals = torch.randn(12, generator=g, dtype=torch.float64)
    pi_ref = torch.softmax(torch.randn(12, generator=g, dtype=torch.float64), -1)
    beta = 0.7
    star = pi_ref * torch.exp(q_vals / beta)
    star = star / star.sum()
    best = (star * q_vals).sum() - beta * kl(star, pi_ref)
    assert best.item() == pytest.approx(risk.erm(q_vals, pi_ref, 1 / beta).item(), abs=1e-12)
    others = torch.softmax(3 * torch.randn(2000, 12, generator=g, dtype=torch.float64), -1)
    others = torch.cat([others, 0.9 * star + 0.1 * others[:100]])  # near misses too
    objective = (others * q_vals).sum(-1) - beta * kl(others, pi_ref)
    assert torch.all(objective < best)


def maximise(objective, init_logits, steps=3000):
    z = init_logits.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([z], lr=1, max_iter=steps, tolerance_grad=1e-14, tolerance_change=1e-16,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = -objective(torch.softmax(z, -1))
        loss.backward()
        return loss

    opt.step(closure)
    return torch.softmax(z, -1).detach()


def dpo_stage(reference, utility, beta):
    """One DPO stage on a one-state bandit, through risk.preference_loss: minimise the population loss over every
    ordered pair (i, j), with i preferred with Bradley-Terry probability sigmoid(utility_i - utility_j)."""
    n = reference.shape[0]
    i, j = (x.flatten() for x in torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij"))
    keep = i != j
    i, j = i[keep], j[keep]
    prefer = torch.sigmoid(utility[i] - utility[j])

    def loss_of(p):
        logratio = p.log() - reference.log()
        return (prefer * risk.preference_loss(logratio[i], logratio[j], beta=beta, variant="dpo")[0]).sum()

    return maximise(lambda p: -loss_of(p), reference.log())


def test_stepwise_alignment_lands_on_one_shot_optimum():
    """RSA / SACPO's factorisation, through the project's DPO loss: a reward stage (reference pi_ref, beta_r) then a
    safety stage whose reference is the reward-stage policy (beta_s = beta_r / lambda) land on the one-shot optimum
    pi_ref exp((r - lambda c) / beta_r) / Z. A safety stage referred to pi_ref instead lands elsewhere."""
    g = torch.Generator().manual_seed(2)
    r = torch.randn(8, generator=g, dtype=torch.float64)
    c = torch.rand(8, generator=g, dtype=torch.float64) * 2
    pi_ref = torch.softmax(torch.randn(8, generator=g, dtype=torch.float64), -1)
    beta_r, beta_s = 0.5, 0.2
    lam = beta_r / beta_s
    pi_r = dpo_stage(pi_ref, r, beta_r)
    assert torch.allclose(pi_r, torch.softmax(pi_ref.log() + r / beta_r, -1), atol=1e-6)
    pi_rs = dpo_stage(pi_r, -c, beta_s)
    one_shot = torch.softmax(pi_ref.log() + (r - lam * c) / beta_r, -1)
    assert torch.allclose(pi_rs, one_shot, atol=1e-6)
    wrong_reference = dpo_stage(pi_ref, -c, beta_s)  # the pitfall: the safety stage against the SFT model
    assert not torch.allclose(wrong_reference, one_shot, atol=1e-2)


# ---------------------------------------------------------------- from the tree to the loss (Ra-DPO Thm 3.6)


def advantage_optimal_policy(rewards, pi_ref, measure, level, beta):
    """On an explicit tree: the risk-aware advantages of the reference, A(s_t, a) = Qaug(s_t, a) - Phi_r[Qaug(s_t, .)]
    with Qaug the augmented reward values under pi_ref and Phi_r(X) = -Phi(-X) the reward-side measure (Ra-DPO
    Def. 3.2), and the closed-form optimum pi*(a | s_t) = pi_ref exp(A / beta) / Z(s_t) (Ra-DPO Eq. 11-12)."""
    q_cost = risk.augmented_q_values([-r for r in rewards], pi_ref, measure, level)  # Qaug_reward = -Qaug_cost
    adv = [-q + risk.risk_measure(q, p, measure, level).unsqueeze(-1) for q, p in zip(q_cost, pi_ref)]
    star = [torch.softmax(p.log() + a / beta, -1) for p, a in zip(pi_ref, adv)]
    return adv, star


@pytest.mark.parametrize("measure,level", [("expectation", None), ("cvar", 0.3), ("erm", 2.0)])
def test_sum_of_advantages_is_the_ra_dpo_reward_of_the_loss(measure, level):
    """Along every response of a small tree, sum_t A(s_t, y_t) = beta log(pi*/pi_ref)(y) + beta SeqRR(y) (Ra-DPO
    Thm 3.6 and its appendix derivation), where the right side is what the training path computes:
    risk.sequence_terms (identity heads over the tree's log-probabilities) into risk.preference_loss's reward.
    ERM is not positively homogeneous: Phi(beta D) = beta ERM_{mu beta}(D), so its SeqRR must be taken at level
    mu x beta, which is what --erm_on_rewards gives (stage.LossConfig); at level mu the identity fails."""
    import argparse

    import stage

    k, depth, beta = 3, 3, 0.5
    costs, pi_ref = random_tree(k=k, depth=depth, seed=7)
    rewards = [2 * c - 3 for c in costs]  # rewards of either sign
    adv, star = advantage_optimal_policy(rewards, pi_ref, measure, level, beta)
    paths = list(itertools.product(range(k), repeat=depth))
    # per position along each path: log pi*(. | s_t) and log pi_ref(. | s_t) over the k tokens, and the token taken
    pol = torch.stack([torch.stack([star[t][y[:t]].log() for t in range(depth)]) for y in paths])
    ref = torch.stack([torch.stack([pi_ref[t][y[:t]].log() for t in range(depth)]) for y in paths])
    labels = torch.tensor(paths)
    mask = torch.ones(len(paths), depth, dtype=torch.bool)
    want = torch.tensor([sum(adv[t][y[: t + 1]].item() for t in range(depth)) for y in paths], dtype=torch.float64)
    head = torch.nn.Linear(k, k, bias=False, dtype=torch.float64)
    with torch.no_grad():
        head.weight.copy_(torch.eye(k, dtype=torch.float64))
    flags = argparse.Namespace(loss="ra_dpo1", risk_measure=measure, risk_level=level, beta=beta, alpha=0.5,
                               split_vocab=False, loss_reduction="mean", chunk_size=5,
                               erm_on_rewards=measure == "erm")
    loss_config = stage.LossConfig.from_args(flags)
    logratio, _, seq_rr = risk.sequence_terms(pol, ref, head, head, labels, mask, loss_config.measure,
                                              loss_config.level, loss_config.chunk_size)
    reward = risk.preference_loss(logratio, logratio, seq_rr, seq_rr, beta=loss_config.beta,
                                  variant=loss_config.loss)[1]
    assert want.abs().max() > 0.1 and want.std() > 0.1  # a tree where the advantages matter
    # the vocabulary terms run in fp32 (risk.py's numerics), sums of 3 positions of size ~1: 1e-5 is fp32 rounding
    assert torch.allclose(reward.double(), want, atol=1e-5)
    if measure == "erm":  # the same mu on D (the default) is a different risk aversion: the identity fails
        unscaled = risk.sequence_terms(pol, ref, head, head, labels, mask, "erm", level)[2]
        assert not torch.allclose((beta * (logratio + unscaled)).double(), want, atol=1e-2)


# ---------------------------------------------------------------- Sec. 4: sequential terms


def loop_sequential(policy_logits, reference_logits, mask, measure, level):
    """Per position, float64, with the brute-force measures: sum_t Phi_{p_ref}[log p_ref - log p_pi]."""
    n, t_len, _ = policy_logits.shape
    out = []
    for i in range(n):
        total = 0.0
        for t in range(t_len):
            if not mask[i, t]:
                continue
            lp = torch.log_softmax(policy_logits[i, t].double(), -1)
            lr = torch.log_softmax(reference_logits[i, t].double(), -1)
            total += bf_measure((lr - lp).tolist(), lr.exp().tolist(), measure, level)
        out.append(total)
    return torch.tensor(out, dtype=torch.float64)


def batch(n=3, t=5, v=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    pol = torch.randn(n, t, v, generator=g) * 2
    ref = torch.randn(n, t, v, generator=g) * 2
    mask = torch.rand(n, t, generator=g) > 0.3
    mask[:, 0] = True
    return pol, ref, mask


@pytest.mark.parametrize("measure,level", [("expectation", None), ("cvar", 0.25), ("erm", 2.0)])
def test_sequential_terms_match_per_position_loop(measure, level):
    pol, ref, mask = batch()
    want = loop_sequential(pol, ref, mask, measure, level)
    got = risk.sequential_risk_ratio(pol, ref, mask, measure, level)
    assert torch.allclose(got.double(), want, atol=1e-5)
    if measure == "expectation":
        assert torch.allclose(risk.sequential_kl(pol, ref, mask).double(), want, atol=1e-5)


@pytest.mark.parametrize("measure,level", [("expectation", None), ("cvar", 0.25), ("erm", 2.0), ("cvar_radpo", 0.9)])
def test_masked_positions_contribute_exactly_nothing(measure, level):
    pol, ref, mask = batch()
    pol.requires_grad_(True)
    out = risk.sequential_risk_ratio(pol, ref, mask, measure, level)
    out.sum().backward()
    assert torch.all(pol.grad[~mask] == 0)
    garbage_pol, garbage_ref = pol.detach().clone(), ref.clone()
    garbage_pol[~mask] = 1e4 * torch.randn_like(garbage_pol[~mask])
    garbage_ref[~mask] = -1e4
    assert torch.equal(risk.sequential_risk_ratio(garbage_pol, garbage_ref, mask, measure, level), out.detach())


@pytest.mark.parametrize("measure,level", [(None, None), ("expectation", None), ("cvar", 0.25), ("erm", 2.0),
                                           ("cvar_radpo", 0.95)])
def test_sequence_terms_chunked_equals_plain_path(measure, level):
    torch.manual_seed(0)
    n, t, h, v = 4, 6, 8, 13
    hid_pi = torch.randn(n, t, h, requires_grad=True)
    hid_ref = torch.randn(n, t, h, requires_grad=True)  # requires grad here, so a leak into the reference would show
    head_pi, head_ref = torch.nn.Linear(h, v, bias=False), torch.nn.Linear(h, v, bias=False)
    labels = torch.randint(0, v, (n, t))
    mask = torch.rand(n, t) > 0.4
    mask[:, 0] = True

    # plain path: full logits, then gather / sequential_* functions
    lp, lr = head_pi(hid_pi), head_ref(hid_ref).detach()
    logp, ref_logp = lp.log_softmax(-1), lr.log_softmax(-1)
    tok = (logp - ref_logp).gather(-1, labels[..., None]).squeeze(-1)
    plain = [torch.where(mask, tok, 0).sum(-1), risk.sequential_kl(lp, lr, mask)]
    if measure is not None:
        plain.append(risk.sequential_risk_ratio(lp, lr, mask, measure, level))
    plain_grads = torch.autograd.grad(sum(x.sum() * (i + 1) for i, x in enumerate(plain)),
                                      [hid_pi, head_pi.weight])

    for chunk in (1, 5, 1000):
        got = risk.sequence_terms(hid_pi, hid_ref, head_pi, head_ref, labels, mask, measure, level, chunk)
        got = [x for x in got if x is not None]
        for a, b in zip(got, plain):
            assert torch.allclose(a, b, atol=1e-5)
        grads = torch.autograd.grad(sum(x.sum() * (i + 1) for i, x in enumerate(got)), [hid_pi, head_pi.weight])
        for a, b in zip(grads, plain_grads):
            assert torch.allclose(a, b, atol=1e-5)
        # no gradient reaches the reference: its hidden states and head are not in the graph at all
        total = sum(x.sum() for x in risk.sequence_terms(hid_pi, hid_ref, head_pi, head_ref, labels, mask, measure,
                                                          level, chunk) if x is not None)
        assert torch.autograd.grad(total, [hid_ref, head_ref.weight], allow_unused=True) == (None, None)


@pytest.mark.parametrize("measure,level", [("expectation", None), ("cvar", 0.1), ("erm", 5.0), ("cvar_radpo", 0.95)])
def test_full_vocabulary_and_extreme_logits_stay_finite(measure, level):
    pol = torch.randn(2, 3, 32000) * 1e4
    ref = torch.randn(2, 3, 32000) * 1e4
    pol.requires_grad_(True)
    mask = torch.ones(2, 3, dtype=torch.bool)
    out = risk.sequential_risk_ratio(pol, ref, mask, measure, level)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(pol.grad).all()


# ---------------------------------------------------------------- Sec. 5: losses, against independent transcriptions


def tdpo_transcription(pol_w, ref_w, y_w, m_w, pol_l, ref_l, y_l, m_l, beta, alpha, version):
    """TDPO written from the TDPO paper / docs/math.md Sec. 5, float64, with its own per-position KL."""
    def seq(pol, ref, y, m):
        p_ref = torch.softmax(ref.double(), -1)
        log_pi = torch.log_softmax(pol.double(), -1)
        log_ref = torch.log_softmax(ref.double(), -1)
        kl_t = (p_ref * (log_ref - log_pi)).sum(-1)
        lr_t = (log_pi - log_ref).gather(-1, y[..., None]).squeeze(-1)
        return (lr_t * m).sum(-1), (kl_t * m).sum(-1)

    lr_w, kl_w = seq(pol_w, ref_w, y_w, m_w)
    lr_l, kl_l = seq(pol_l, ref_l, y_l, m_l)
    margin = lr_w - lr_l
    if version == 1:
        z = beta * margin - beta * (kl_l - kl_w)
    else:
        z = beta * margin - alpha * beta * (kl_l - kl_w.detach())
    return -torch.log(torch.sigmoid(z))


def pair_batch(seed=0):
    pol_w, ref_w, m_w = batch(seed=seed)
    pol_l, ref_l, m_l = batch(seed=seed + 100)
    g = torch.Generator().manual_seed(seed)
    y_w, y_l = torch.randint(0, 11, m_w.shape, generator=g), torch.randint(0, 11, m_l.shape, generator=g)
    return pol_w, ref_w, y_w, m_w, pol_l, ref_l, y_l, m_l


def ours(pol_w, ref_w, y_w, m_w, pol_l, ref_l, y_l, m_l, measure, level, beta, alpha, variant):
    def seq(pol, ref, y, m):
        lr = torch.where(m, (pol.log_softmax(-1) - ref.log_softmax(-1)).gather(-1, y[..., None]).squeeze(-1), 0)
        return lr.sum(-1), risk.sequential_risk_ratio(pol, ref, m, measure, level)

    lr_w, rr_w = seq(pol_w, ref_w, y_w, m_w)
    lr_l, rr_l = seq(pol_l, ref_l, y_l, m_l)
    return risk.preference_loss(lr_w, lr_l, rr_w, rr_l, beta, alpha, variant)[0]


@pytest.mark.parametrize("measure,level", [("expectation", None), ("cvar", 1.0)])
@pytest.mark.parametrize("variant,version", [("ra_dpo1", 1), ("ra_dpo2", 2)])
def test_ra_dpo_with_expectation_or_full_cvar_is_tdpo(measure, level, variant, version):
    data = pair_batch()
    want = tdpo_transcription(*data, beta=0.3, alpha=0.5, version=version)
    got = ours(*data, measure, level, beta=0.3, alpha=0.5, variant=variant)
    assert torch.allclose(got.double(), want, atol=1e-6)


@pytest.mark.parametrize("measure,level", [("cvar", 0.2), ("erm", 2.0), ("cvar_radpo", 0.95)])
def test_ra_dpo2_with_alpha_zero_is_dpo(measure, level):
    pol_w, ref_w, y_w, m_w, pol_l, ref_l, y_l, m_l = pair_batch(seed=3)

    def logp_sum(pol, y, m):  # DPO from log-probs of the sampled tokens only
        return sum(math.log(torch.softmax(pol[i, t].double(), -1)[y[i, t]].item())
                   for i, t in itertools.product(range(pol.shape[0]), range(pol.shape[1])) if m[i, t])

    beta = 0.25
    got = ours(pol_w, ref_w, y_w, m_w, pol_l, ref_l, y_l, m_l, measure, level, beta, 0.0, "ra_dpo2")
    for i in range(got.shape[0]):
        pi_w = logp_sum(pol_w[i:i + 1], y_w[i:i + 1], m_w[i:i + 1])
        rf_w = logp_sum(ref_w[i:i + 1], y_w[i:i + 1], m_w[i:i + 1])
        pi_l = logp_sum(pol_l[i:i + 1], y_l[i:i + 1], m_l[i:i + 1])
        rf_l = logp_sum(ref_l[i:i + 1], y_l[i:i + 1], m_l[i:i + 1])
        z = beta * ((pi_w - rf_w) - (pi_l - rf_l))
        assert got[i].item() == pytest.approx(math.log1p(math.exp(-z)), abs=1e-5)


def test_stop_gradient_only_on_the_chosen_risk_of_ra_dpo2():
    lr_w, lr_l = torch.randn(5), torch.randn(5)
    rr_w = torch.rand(5, requires_grad=True)
    rr_l = torch.rand(5, requires_grad=True)
    loss = risk.preference_loss(lr_w, lr_l, rr_w, rr_l, 0.1, 0.5, "ra_dpo2")[0].sum()
    g_w, g_l = torch.autograd.grad(loss, [rr_w, rr_l], allow_unused=True)
    assert g_w is None and torch.all(g_l != 0)  # the chosen risk is not in the graph at all
    loss1 = risk.preference_loss(lr_w, lr_l, rr_w, rr_l, 0.1, 0.5, "ra_dpo1")[0].sum()
    g1_w, g1_l = torch.autograd.grad(loss1, [rr_w, rr_l])
    assert torch.all(g1_w != 0) and torch.allclose(g1_w, -g1_l)  # ra_dpo1: the two risks enter symmetrically
    # through a real sequential term: the policy gets gradient from the rejected side's risk only
    pol, ref, m = batch(seed=7)
    pol_w, pol_l = pol.clone().requires_grad_(True), pol.clone().requires_grad_(True)
    rr_w = risk.sequential_risk_ratio(pol_w, ref, m, "cvar", 0.3)
    rr_l = risk.sequential_risk_ratio(pol_l, ref, m, "cvar", 0.3)
    loss = risk.preference_loss(torch.zeros(3), torch.zeros(3), rr_w, rr_l, 0.1, 0.5, "ra_dpo2")[0].sum()
    g_w, g_l = torch.autograd.grad(loss, [pol_w, pol_l], allow_unused=True)
    assert g_w is None and g_l.abs().sum() > 0


def test_rewards_and_loss_values():
    lr_w, lr_l, rr_w, rr_l = torch.tensor([1.0]), torch.tensor([-1.0]), torch.tensor([0.5]), torch.tensor([2.0])
    losses, chosen_reward, rejected_reward = risk.preference_loss(lr_w, lr_l, rr_w, rr_l, beta=0.1, alpha=0.5,
                                                                  variant="ra_dpo2")
    z = 0.1 * 2.0 - 0.5 * 0.1 * (2.0 - 0.5)
    assert losses.item() == pytest.approx(math.log1p(math.exp(-z)))
    assert chosen_reward.item() == pytest.approx(0.15) and rejected_reward.item() == pytest.approx(0.1)
    losses, chosen_reward, rejected_reward = risk.preference_loss(lr_w, lr_l, beta=0.1, variant="dpo")
    assert losses.item() == pytest.approx(math.log1p(math.exp(-0.2))) and chosen_reward.item() == pytest.approx(0.1)
    with pytest.raises(ValueError, match="choose one of"):
        risk.preference_loss(lr_w, lr_l, rr_w, rr_l, variant="ipo")
    with pytest.raises(ValueError, match="needs chosen_risk"):
        risk.preference_loss(lr_w, lr_l, variant="ra_dpo2")


def test_pipeline_terms_equal_f_log_softmax_gather():
    """logratio from sequence_terms is the plain sum of token log-ratios (DPO's _get_batch_logps)."""
    pol, ref, mask = batch(v=7)
    labels = torch.randint(0, 7, mask.shape)
    eye = torch.nn.Identity()
    got = risk.sequence_terms(pol, ref, eye, eye, labels, mask, None, None, chunk_size=2)[0]
    want = ((F.log_softmax(pol, -1) - F.log_softmax(ref, -1)).gather(-1, labels[..., None]).squeeze(-1) * mask).sum(-1)
    assert torch.allclose(got, want, atol=1e-5)


class AutogradHead(torch.nn.Linear):
    """A Linear that sequence_terms does not recognise as plain: it takes the checkpointed autograd path."""


@pytest.mark.parametrize("measure,level,split", [(None, None, False), ("expectation", None, False),
                                                 ("cvar", 0.25, False), ("cvar", 1.0, False), ("erm", 2.0, False),
                                                 ("cvar_radpo", 0.9, False), ("cvar_radpo", 0.9, True)])
@pytest.mark.parametrize("uses", ["all", "training"])
def test_closed_form_gradient_equals_autograd(measure, level, split, uses):
    """The fused chunks (closed-form gradient) against the checkpointed autograd chunks: all four outputs and the
    gradients with respect to the hidden states and the head weight, under a loss that weights each differently
    ("all") or, as ra_dpo2 training does, uses only the log-ratios and the risk of later sequences ("training": no
    gradient reaches the KL, nor the risk of the first sequence, whose positions fill whole chunks)."""
    g = torch.Generator().manual_seed(11)
    n, t, h, v = 3, 7, 8, 29
    hid_pi, hid_ref = torch.randn(n, t, h, generator=g), torch.randn(n, t, h, generator=g)
    labels = torch.randint(0, v, (n, t), generator=g)
    mask = torch.rand(n, t, generator=g) > 0.3
    weight, ref_weight = torch.randn(v, h, generator=g), torch.randn(v, h, generator=g)
    results = []
    for cls in (torch.nn.Linear, AutogradHead):
        head, ref_head = cls(h, v, bias=False), cls(h, v, bias=False)
        with torch.no_grad():
            head.weight.copy_(weight)
            ref_head.weight.copy_(ref_weight)
        x = hid_pi.clone().requires_grad_(True)
        out = risk.sequence_terms(x, hid_ref, head, ref_head, labels, mask, measure, level, 4, split_vocab=split,
                                  with_logps=True)
        if uses == "training":
            loss = out[0].pow(2).sum() + (out[2][1:].pow(2).sum() if measure else 0)
        out = [o for o in out if o is not None]
        if uses == "all":
            loss = sum((i + 1.5) * o.pow(2).sum() for i, o in enumerate(out))  # non-uniform incoming gradients
        results.append((out, torch.autograd.grad(loss, [x, head.weight])))
    (fused, fused_grads), (auto, auto_grads) = results
    for a, b in zip(fused + list(fused_grads), auto + list(auto_grads)):  # fp32 rounding: 1e-6 of the largest
        assert (a - b).abs().max() <= 1e-6 * b.abs().max() + 1e-6, ((a - b).abs().max(), b.abs().max())
