"""The math of Risk-aware Stepwise Alignment (RSA, arXiv 2512.24263) and Ra-DPO (arXiv 2505.20359).

Read next to the papers and `docs/math.md`; section numbers below refer to that page. The definitions come first,
each written as its formula reads; the training path's fast versions follow in one fenced section at the end.

    Sec. 2  risk measures on a discrete distribution  expectation, cvar, erm, cvar_radpo, risk_measure
    Sec. 3  nested risk on a token tree               nested_q_values, augmented_q_values
    Sec. 4  sequential risk ratio (per response)      sequential_kl, sequential_risk_ratio
    Sec. 5  preference losses                         preference_loss
    Training path                                     sequence_terms (what the stages call), fast_cvar,
                                                      fast_cvar_radpo, the fused chunks

Conventions: larger `values` are worse (a loss or cost); distributions lie along the last dimension and every
function broadcasts over the leading ones; per-sequence quantities are sums over response tokens, never means.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

MEASURES = ("expectation", "cvar", "erm", "cvar_radpo")
VARIANTS = ("dpo", "ra_dpo1", "ra_dpo2")


# --------------------------------------------------------------------------------------------------------------
# Sec. 2: risk measures on a discrete distribution
# --------------------------------------------------------------------------------------------------------------


def _probs(probs, log_probs):
    """Exactly one of probs / log_probs; returns probabilities (exp of log_probs where those were given)."""
    if (probs is None) == (log_probs is None):
        raise ValueError("pass exactly one of probs= or log_probs=")
    return probs if probs is not None else log_probs.exp()


def expectation(values, probs=None, *, log_probs=None):
    """E_p[v] = sum_z p(z) v(z) over the last dimension."""
    p = _probs(probs, log_probs)
    # where p == 0, v may be +-inf: such atoms carry no mass, so they contribute exactly 0
    return torch.where(p > 0, p * values, torch.zeros_like(values)).sum(-1)


def _check_level(level, name="level"):
    if level is None or not (0.0 < float(level) <= 1.0):
        raise ValueError(f"CVaR {name} must be in (0, 1] (the tail mass kept; 1 is the expectation), got {level!r}")


def cvar(values, probs=None, level=None, *, log_probs=None):
    """CVaR at `level` in (0, 1]: the mean of v over the worst (largest) `level` of probability mass [choice].

    Walk the atoms from the worst down, taking mass until `level` is used up: the value where it runs out is the
    VaR t, every atom above t counts in full and the atoms at t share the remainder,

        CVaR = (sum_{v > t} p v + (level - P(v > t)) t) / level.

    level = 1 is exactly the expectation. Check: v = [1, 2, 5, 10], p uniform, level 0.5 -> 7.5. The VaR carries no
    gradient; the gradient w.r.t. v is each atom's weight: p / level above t, and the remainder spread over the atoms
    at t in proportion to p (at ties the subgradient that treats tied atoms alike: with all values equal it is p, the
    expectation's). The training path finds t without a full sort (fast_cvar, the same numbers).
    """
    _check_level(level)
    p = _probs(probs, log_probs)
    if float(level) == 1.0:
        return expectation(values, p)
    with torch.no_grad():  # the walk: sort from the worst down, the VaR is where the mass taken reaches `level`
        worst_first, order = values.sort(dim=-1, descending=True)
        taken = p.gather(-1, order).cumsum(-1)
        at_level = torch.searchsorted(taken, torch.full_like(taken[..., :1], float(level)))
        var = worst_first.gather(-1, at_level.clamp_(max=values.shape[-1] - 1))
        above = (p * (values > var)).sum(-1, keepdim=True)
        share = (level - above) / (p * (values == var)).sum(-1, keepdim=True).clamp(min=torch.finfo(p.dtype).tiny)
    return expectation(values, p * ((values > var) + share * (values == var))) / level


def erm(values, probs=None, mu=None, *, log_probs=None):
    """Entropic risk (1/mu) log E_p[exp(mu v)], mu > 0, as (1/mu) logsumexp(log p + mu v).

    Pass log_probs= where p may underflow (Sec. 2): exp(log p) is 0 below about -103 in fp32 while mu * v can be
    huge there, so going through probabilities would silently drop the dominant terms.
    """
    if mu is None or not float(mu) > 0.0:
        raise ValueError(f"ERM mu must be > 0 (mu -> 0 is the expectation), got {mu!r}")
    if log_probs is None:
        if probs is None:
            raise ValueError("pass exactly one of probs= or log_probs=")
        log_probs = probs.log()  # log 0 = -inf: that atom drops out of the logsumexp, as it should
    elif probs is not None:
        raise ValueError("pass exactly one of probs= or log_probs=")
    return torch.logsumexp(log_probs + mu * values, dim=-1) / mu


def cvar_radpo(values, probs=None, level=None, *, log_probs=None, split_vocab=False):
    """The Ra-DPO authors' code form of CVaR (Sec. 2), kept for parity with their published numbers.

        threshold = torch.quantile(v, 1 - level)   (unweighted, linear interpolation, over the last dimension)
        result    = sum_z p(z) v(z) [v(z) > threshold]     (no 1 / level)

    Not a coherent risk measure (not translation equivariant, can fall below the expectation). `split_vocab=True`
    reproduces their `is_split_risk_ratio` quirk: the two halves of the vocabulary get separate thresholds. The
    training path finds the quantile without a sort (fast_cvar_radpo, bitwise the same thresholds).
    """
    _check_level(level)
    p = _probs(probs, log_probs)
    halves = (values[..., : values.shape[-1] // 2], values[..., values.shape[-1] // 2:]) if split_vocab else (values,)
    with torch.no_grad():
        thresholds = [torch.quantile(h, 1.0 - float(level), dim=-1, keepdim=True) for h in halves]
    tail = torch.cat([h > t for h, t in zip(halves, thresholds)], dim=-1)
    return expectation(values, p * tail)


def risk_measure(values, probs=None, measure="expectation", level=None, *, log_probs=None, split_vocab=False):
    """Dispatch to a risk measure by name: expectation (level ignored), cvar, erm (level is mu), cvar_radpo."""
    if measure == "expectation":
        return expectation(values, probs, log_probs=log_probs)
    if measure == "cvar":
        return cvar(values, probs, level, log_probs=log_probs)
    if measure == "erm":
        return erm(values, probs, level, log_probs=log_probs)
    if measure == "cvar_radpo":
        return cvar_radpo(values, probs, level, log_probs=log_probs, split_vocab=split_vocab)
    raise ValueError(f"unknown risk measure {measure!r}; choose one of {', '.join(MEASURES)}")


def check_measure(measure, level):
    """Raise ValueError early (before any training) for an unknown measure or an out-of-range level."""
    if measure not in MEASURES:
        raise ValueError(f"unknown risk measure {measure!r}; choose one of {', '.join(MEASURES)}")
    if measure in ("cvar", "cvar_radpo"):
        _check_level(level, "risk_level")
    elif measure == "erm" and (level is None or not float(level) > 0.0):
        raise ValueError(f"ERM risk_level (mu) must be > 0, got {level!r}")


# --------------------------------------------------------------------------------------------------------------
# Sec. 3: nested risk on an explicit token tree
# --------------------------------------------------------------------------------------------------------------
#
# A full tree of depth T over K tokens. State s_t is a prefix of t tokens; arrays are indexed by the tokens of the
# path, so a per-(state, action) quantity at depth t has shape (K,) * (t + 1) and its last axis is the action:
#   costs[t][a_0, ..., a_t]      = C(s_t, a_t)            per-token cost of taking a_t after prefix a_0..a_{t-1}
#   policies[t][a_0, ..., a_t]   = pi(a_t | s_t)          sums to 1 over the last axis
# Because the path to a state is unique, "the next state" is just one more index: Q at depth t + 1 reduced over its
# last axis (the next action, drawn from pi(. | s_{t+1})) has exactly the shape of Q at depth t.


def nested_q_values(costs, policies, measure="expectation", level=None):
    """Nested Bellman recursion (RSA Eq. 4, Ra-DPO Eq. 5), risk applied at every step:

        Q(s_T, a) = C(s_T, a);   Q(s_t, a) = C(s_t, a) + Phi_{a' ~ pi(.|s_{t+1})}[ Q(s_{t+1}, a') ].
    Returns the list [Q_0, ..., Q_{T-1}].
    """
    q = [None] * len(costs)
    q[-1] = costs[-1]
    for t in range(len(costs) - 2, -1, -1):
        q[t] = costs[t] + risk_measure(q[t + 1], policies[t + 1], measure, level)
    return q


def augmented_q_values(costs, policies, measure="expectation", level=None):
    """Augmented values (Ra-DPO Eq. 6-7, Lemma 3.1; RSA Sec. IV-A): the accumulated cost travels in the state, and
    all cost is paid at the leaf: Qaug(s_{T-1}, a) = C_{1:T}; Qaug(s_t, a) = Phi_{a'}[ Qaug(s_{t+1}, a') ].
    By translation equivariance Qaug(s_t, a) = Q(s_t, a) + C_{1:t-1}(s_t).
    """
    total = costs[0]
    for c in costs[1:]:
        total = total.unsqueeze(-1) + c  # path cost so far, extended by one token
    q = [None] * len(costs)
    q[-1] = total
    for t in range(len(costs) - 2, -1, -1):
        q[t] = risk_measure(q[t + 1], policies[t + 1], measure, level)
    return q


def path_costs_before(costs):
    """C_{1:t-1}(s_t) for every depth t, shaped like Q_t (the cost paid on the way to s_t, broadcast over a_t)."""
    out = [torch.zeros_like(costs[0])]
    running = torch.zeros_like(costs[0][..., 0])  # on the costs' device and in their dtype
    for t in range(1, len(costs)):
        running = running.unsqueeze(-1) + costs[t - 1]
        out.append(running.unsqueeze(-1).expand_as(costs[t]))
    return out


# --------------------------------------------------------------------------------------------------------------
# Sec. 4: sequential KL and sequential risk ratio
# --------------------------------------------------------------------------------------------------------------


def _position_terms(policy_logits, reference_logits, measure, level, split_vocab=False, phi=None):
    """Per position: log pi_theta and log pi_ref over the vocabulary, the KL(pi_ref || pi_theta), and rho_t (with
    the measure `phi`, default risk_measure)."""
    logp = F.log_softmax(policy_logits.float(), dim=-1)
    with torch.no_grad():  # no gradient through the reference
        ref_logp = F.log_softmax(reference_logits.float(), dim=-1)
    d = ref_logp - logp  # D_t(z) = log pi_ref(z|s_t) - log pi_theta(z|s_t)
    kl = expectation(d, log_probs=ref_logp)
    if measure is None:
        return logp, ref_logp, kl, None
    if measure == "expectation":
        return logp, ref_logp, kl, kl
    return logp, ref_logp, kl, (phi or risk_measure)(d, measure=measure, level=level, log_probs=ref_logp,
                                                     split_vocab=split_vocab)


def sequential_kl(policy_logits, reference_logits, mask):
    """SeqKL(x, y) = sum over response positions of KL(pi_ref(.|s_t) || pi_theta(.|s_t)) (TDPO). Returns (N,).

    Logits (N, T, V): position t is the distribution over the response token at t (callers shift); mask (N, T) bool.
    """
    kl = _position_terms(policy_logits, reference_logits, None, None)[2]
    return torch.where(mask, kl, torch.zeros_like(kl)).sum(-1)


def sequential_risk_ratio(policy_logits, reference_logits, mask, measure, level=None, *, split_vocab=False):
    """SeqRR(x, y) = sum_t Phi_{z ~ pi_ref(.|s_t)}[ log pi_ref(z|s_t) - log pi_theta(z|s_t) ] (Ra-DPO Eq. 16)."""
    check_measure(measure, level)
    rho = _position_terms(policy_logits, reference_logits, measure, level, split_vocab)[3]
    return torch.where(mask, rho, torch.zeros_like(rho)).sum(-1)


# --------------------------------------------------------------------------------------------------------------
# Sec. 5: preference losses
# --------------------------------------------------------------------------------------------------------------


def preference_loss(chosen_logratio, rejected_logratio, chosen_risk=None, rejected_risk=None, beta=0.1, alpha=0.5,
                    variant="ra_dpo2"):
    """Per-pair losses and (detached) rewards.

        u        = beta * (logratio_w - logratio_l)
        dpo      = -log sigmoid(u)
        ra_dpo1  = -log sigmoid(u - beta * (SeqRR_l - SeqRR_w))                       (Ra-DPO Eq. 17)
        ra_dpo2  = -log sigmoid(u - alpha * beta * (SeqRR_l - sg(SeqRR_w)))           (Ra-DPO Eq. 19, RSA Eq. 15)
    `alpha` is the ra_dpo2 loss weight, not the risk level. Rewards are the Ra-DPO paper's
    beta * (logratio + SeqRR) (beta * logratio for dpo, where no risk is given).
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown loss variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    u = beta * (chosen_logratio - rejected_logratio)
    if variant == "dpo":
        logits = u
    elif chosen_risk is None or rejected_risk is None:
        raise ValueError(f"loss {variant!r} needs chosen_risk and rejected_risk")
    elif variant == "ra_dpo1":
        logits = u - beta * (rejected_risk - chosen_risk)
    else:
        logits = u - alpha * beta * (rejected_risk - chosen_risk.detach())
    losses = -F.logsigmoid(logits)
    chosen_extra = chosen_risk if chosen_risk is not None else 0.0
    rejected_extra = rejected_risk if rejected_risk is not None else 0.0
    chosen_rewards = (beta * (chosen_logratio + chosen_extra)).detach()
    rejected_rewards = (beta * (rejected_logratio + rejected_extra)).detach()
    return losses, chosen_rewards, rejected_rewards


# ==============================================================================================================
# The training path: the same terms, fast and memory-light
# ==============================================================================================================
#
# Everything below computes what the definitions above define, faster: the VaR by bisection and a small partial
# selection instead of a sort (fast_cvar), the authors' quantile by partial selection (fast_cvar_radpo), and the
# per-response terms chunk by chunk from hidden states with the gradient in closed form (sequence_terms). The tests
# that hold them equal to the definitions, in tests/test_risk.py:
#   fast_cvar        test_fast_selections_equal_the_definitions, test_cvar_gradient_at_ties_spreads_the_remainder_
#                    in_proportion_to_p, test_cvar_with_a_narrow_bulk_and_an_outlier_matches_the_walk
#   fast_cvar_radpo  test_fast_selections_equal_the_definitions, test_linear_quantile_without_sort_equals_torch_
#                    quantile, test_cvar_radpo_equals_quantile_transcription
#   sequence_terms   test_sequence_terms_chunked_equals_plain_path, test_closed_form_gradient_equals_autograd,
#                    test_pipeline_terms_equal_f_log_softmax_gather, test_full_vocabulary_and_extreme_logits_stay_finite


def fast_cvar(values, probs=None, level=None, *, log_probs=None):
    """cvar, with the VaR found by _cvar_var (no full sort)."""
    _check_level(level)
    p = _probs(probs, log_probs)
    if float(level) == 1.0:
        return expectation(values, p)
    var, share = _cvar_var(values, p, level)
    return expectation(values, _cvar_weights(values, p, var, share, torch.empty_like(values, dtype=p.dtype))) / level


def fast_cvar_radpo(values, probs=None, level=None, *, log_probs=None, split_vocab=False):
    """cvar_radpo, with the thresholds found by _linear_quantile (no sort)."""
    _check_level(level)
    p = _probs(probs, log_probs)
    return expectation(values, p * _radpo_tail(values, _radpo_thresholds(values, level, split_vocab)))


def _fast_measure(values, probs=None, measure="expectation", level=None, *, log_probs=None, split_vocab=False):
    """risk_measure with the fast selections."""
    if measure == "cvar":
        return fast_cvar(values, probs, level, log_probs=log_probs)
    if measure == "cvar_radpo":
        return fast_cvar_radpo(values, probs, level, log_probs=log_probs, split_vocab=split_vocab)
    return risk_measure(values, probs, measure, level, log_probs=log_probs, split_vocab=split_vocab)


def _cvar_weights(values, p, var, share, out):
    """CVaR's weights times level, into `out`: p above the VaR, p * share at it (share = (level - P(v > t)) /
    P(v = t)), 0 below. `out` may be `values` itself."""
    above = values > var
    return torch.eq(values, var, out=out).mul_(share).add_(above).mul_(p)


@torch.no_grad()
def _cvar_var(values, p, level, steps=12, most=2048):
    """(VaR t, share), each (..., 1), without a full sort. Bisection on the value keeps P(v > hi) < level <=
    P(v > lo), so t lies in (lo, hi]: `steps` halvings of the values' own spread, then more, 4 at a time, while a
    row has more than `most` entries in its interval that could still be split (a row whose lo and hi are adjacent
    floats has t = hi). A topk of the entries left in (lo, hi], walked from the top with P(v > hi) as the starting
    mass, finds t (the walk of the definition, restricted to where it ends)."""
    scratch = torch.empty_like(values, dtype=torch.result_type(values, p))  # one buffer for all passes
    minus_inf = torch.tensor(-float("inf"), dtype=values.dtype, device=values.device)
    lo = torch.nextafter(values.amin(-1, keepdim=True), minus_inf)
    hi = values.amax(-1, keepdim=True)
    for step in range(64):  # past 64 halvings, the selection below takes whatever is left
        if step >= steps and step % 4 == 0:
            left, k = _left(values, lo, hi)
            if k <= most:
                break
        mid = lo / 2 + hi / 2  # no overflow between finite floats
        heavy = _mass_above(values, p, mid, scratch) >= level
        lo, hi = torch.where(heavy, mid, lo), torch.where(heavy, hi, mid)
    else:
        left, k = _left(values, lo, hi)
    k = max(1, k)
    top = torch.where(left, values, minus_inf, out=scratch).topk(k, dim=-1)
    start = _mass_above(values, p, hi, scratch)
    p_top = p.gather(-1, top.indices)
    target = torch.full_like(start, float(level))
    var = top.values.gather(-1, torch.searchsorted(start + p_top.cumsum(-1), target).clamp_(max=k - 1))
    above = start + (p_top * (top.values > var)).sum(-1, keepdim=True)
    at = (p_top * (top.values == var)).sum(-1, keepdim=True)  # every atom at var is among the selected
    converged = torch.nextafter(lo, hi) == hi  # (lo, hi] holds one float: the VaR is hi
    if converged.any():
        var = torch.where(converged, hi, var)
        above = torch.where(converged, start, above)
        at = torch.where(converged, _mass_above(values, p, lo, scratch) - start, at)
    return var, (level - above) / at.clamp_(min=torch.finfo(at.dtype).tiny)


def _left(values, lo, hi):
    """The entries in (lo, hi] of the rows where that interval can still be split (in a row whose lo and hi are
    adjacent floats, the VaR is hi), and the most of them in any row."""
    left = (values > torch.where(torch.nextafter(lo, hi) == hi, hi, lo)) & (values <= hi)
    return left, int(left.sum(-1, dtype=torch.int32).max())  # summed in int64, a bool mask is first copied to int64


def _mass_above(values, p, t, scratch):
    """P(v > t), (..., 1): the mask written as 0/1 into `scratch` (a buffer shaped like `values`), times p, summed.
    On the CPU this is three times faster than torch.where(v > t, p, 0), and a fresh buffer per call would cost page
    faults; the numbers are the same (p is finite, so 0 * p is 0)."""
    return torch.gt(values, t, out=scratch).mul_(p).sum(-1, keepdim=True)


_SORTABLE = {torch.float32: torch.int32, torch.float64: torch.int64}


def _sortable_bits(x):
    """The bits of float32/float64 x as integers ordered as the floats are (a negative float's magnitude bits
    flipped); the map is its own inverse. A partial selection on these integers skips the floats' NaN handling: topk
    is about 1.5x faster on the CPU, 1.2x counting the map."""
    bits = x.view(_SORTABLE[x.dtype]) if x.is_floating_point() else x
    negative = torch.bitwise_right_shift(bits, 8 * bits.element_size() - 1)  # all ones for a negative float, else 0
    return negative.bitwise_and_(torch.iinfo(bits.dtype).max).bitwise_xor_(bits)


def _linear_quantile(x, fraction):
    """torch.quantile(x, fraction, dim=-1) (linear interpolation) without a sort: one partial selection (topk) of
    the entries on the nearer side of the quantile, whose two innermost values are the order statistics needed."""
    n = x.shape[-1]
    pos = fraction * (n - 1)
    lo = int(pos)
    hi = min(lo + 1, n - 1)
    keys = _sortable_bits(x) if x.dtype in _SORTABLE else x
    if hi + 1 <= n - lo:  # the hi + 1 smallest entries: their largest two are x_(hi) and x_(lo)
        inner = keys.topk(hi + 1, dim=-1, largest=False, sorted=False).values.topk(min(2, hi + 1), dim=-1).values
        x_hi, x_lo = inner[..., 0], inner[..., -1]
    else:  # the n - lo largest entries: their smallest two are x_(lo) and x_(hi)
        inner = keys.topk(n - lo, dim=-1, sorted=False).values.topk(min(2, n - lo), dim=-1, largest=False).values
        x_lo, x_hi = inner[..., 0], inner[..., -1]
    if keys is not x:
        x_lo, x_hi = _sortable_bits(x_lo).view(x.dtype), _sortable_bits(x_hi).view(x.dtype)
    if hi == lo or pos == lo:
        return x_lo
    # the weight in x's precision, as torch.quantile computes it (bitwise the same result in float32 too)
    return torch.lerp(x_lo, x_hi, torch.tensor(fraction, dtype=x.dtype, device=x.device) * (n - 1) - lo)


@torch.no_grad()
def _radpo_thresholds(values, level, split_vocab=False):
    """The authors' thresholds, (..., 1), or (..., 2) for the two halves of the vocabulary with split_vocab."""
    halves = (values[..., : values.shape[-1] // 2], values[..., values.shape[-1] // 2:]) if split_vocab else (values,)
    return torch.stack([_linear_quantile(h, 1.0 - float(level)) for h in halves], dim=-1)


def _radpo_tail(values, thresholds):
    """values > threshold, each half of the vocabulary against its own threshold when there are two."""
    if thresholds.shape[-1] == 1:
        return values > thresholds
    mid = values.shape[-1] // 2
    return torch.cat([values[..., :mid] > thresholds[..., :1], values[..., mid:] > thresholds[..., 1:]], dim=-1)


# The training path's chunks: values and the gradient in closed form (docs/math.md Sec. 4). With respect to
# D = log p_ref - log p_theta, each measure's gradient is a weight vector w known in closed form: the expectation's
# is p_ref; CVaR's is p_ref / level above the VaR plus the remainder / level spread over the atoms at the VaR in
# proportion to p_ref (one atom unless values tie); the authors' form puts p_ref above its threshold; ERM's is
# softmax(log p_ref + mu D). Through D, the gradient with respect to the policy logits is -w + (sum w)
# softmax(logits); the token log-prob's is onehot - softmax(logits); the KL's is softmax(logits) - p_ref. So the
# forward keeps only per-position scalars (the VaR and the share of the remainder, or the thresholds) and the
# backward recomputes the two projections once, with no sort and no autograd graph of size (chunk x vocabulary).


@torch.no_grad()
def _tail_state(d, p, measure, level, split_vocab):
    """What the weights of a measure need, found once in the forward pass (the sort or the selection)."""
    if measure == "cvar" and float(level) < 1.0:
        return _cvar_var(d, p, level)
    if measure == "cvar_radpo":
        return (_radpo_thresholds(d, level, split_vocab),)
    return ()


@torch.no_grad()
def _tail_weights(d, p, ref_logp, measure, level, state, out):
    """dPhi/dD at one position, from the forward's state (no sort), written into `out` (which may be d itself); the
    expectation's is p itself."""
    if measure == "erm":  # softmax(log p_ref + mu D)
        x = torch.add(ref_logp, d, alpha=level, out=out)
        x.sub_(x.amax(-1, keepdim=True)).exp_()
        return x.div_(x.sum(-1, keepdim=True))
    if measure == "cvar_radpo":
        if state[0].shape[-1] == 1:
            return torch.gt(d, state[0], out=out).mul_(p)
        return out.copy_(_radpo_tail(d, state[0])).mul_(p)
    if measure == "cvar" and state:
        return _cvar_weights(d, p, *state, out).div_(level)
    return p  # the expectation (and CVaR at level 1)


def _log_softmax(hidden, weight):
    """log softmax(hidden @ weight^T), projected in the weight's own precision, normalised in fp32."""
    return F.log_softmax(hidden.to(weight.dtype) @ weight.t(), dim=-1, dtype=torch.float32)


class _FusedChunk(torch.autograd.Function):
    """(logratio, kl, risk, token logp) of a chunk of positions from hidden states and bias-free linear heads.

    It holds few (chunk x vocabulary) buffers and works in place where it can: each such buffer is a pass over
    memory (page faults too, on the CPU, when it is freshly allocated)."""

    @staticmethod
    def forward(ctx, h_pi, weight, h_ref, ref_weight, labels, measure, level, split_vocab):
        with torch.no_grad(), torch.autocast(h_pi.device.type, enabled=False):
            logp = _log_softmax(h_pi, weight)
            ref_logp = _log_softmax(h_ref, ref_weight)
            token = logp.gather(-1, labels[:, None]).squeeze(-1)
            logratio = token - ref_logp.gather(-1, labels[:, None]).squeeze(-1)
            d = logp.neg_().add_(ref_logp)  # D = log p_ref - log p_theta, in logp's buffer
            p = ref_logp.exp()
            kl = torch.linalg.vecdot(p, d)  # D is finite here (finite logits), so no guard against 0 * inf
            state = _tail_state(d, p, measure, level, split_vocab) if measure else ()
            if not measure:
                rho = torch.zeros_like(kl)
            elif measure == "expectation" or measure == "cvar" and float(level) == 1.0:
                rho = kl
            elif measure == "erm":
                rho = torch.logsumexp(ref_logp.add_(d, alpha=level), dim=-1) / level
            else:
                rho = torch.linalg.vecdot(_tail_weights(d, p, None, measure, level, state, ref_logp), d)
            out = torch.stack([logratio, kl, rho, token])
        ctx.save_for_backward(h_pi, weight, h_ref, ref_weight, labels, *state)
        ctx.measure, ctx.level = measure, level
        return out

    @staticmethod
    def backward(ctx, grad):
        h_pi, weight, h_ref, ref_weight, labels, *state = ctx.saved_tensors
        g_token, g_kl, g_rho = grad[0] + grad[3], grad[1], grad[2]
        # Terms without a gradient cost nothing: in training the KL is only logged, and ra_dpo2 stops the gradient
        # of the chosen risk, so chunks of chosen positions (and every chunk of plain DPO) need no reference here.
        with_kl, with_rho = bool(g_kl.any()), bool(ctx.measure) and bool(g_rho.any())
        with torch.no_grad(), torch.autocast(h_pi.device.type, enabled=False):
            # d/dlogits of: token log-prob (onehot - softmax), KL (softmax - p_ref), risk (-w + sum(w) softmax)
            coef = g_kl - g_token
            if with_kl or with_rho:
                logp = _log_softmax(h_pi, weight)
                ref_logp = _log_softmax(h_ref, ref_weight)
                dz = logp.exp()
                d = logp.neg_().add_(ref_logp)
                p = ref_logp.exp()
            else:  # plain DPO's chunks, and those of the chosen responses in ra_dpo2 training
                dz = torch.softmax(h_pi.to(weight.dtype) @ weight.t(), dim=-1, dtype=torch.float32)
            if with_rho:
                w = _tail_weights(d, p, ref_logp, ctx.measure, ctx.level, state, d)
                coef = coef + g_rho * w.sum(-1)
            dz.mul_(coef[:, None])
            if with_kl:
                dz.addcmul_(p, -g_kl[:, None])
            if with_rho:
                dz.addcmul_(w, -g_rho[:, None])
            dz.scatter_add_(-1, labels[:, None], g_token[:, None])
            grad_h = (dz.to(weight.dtype) @ weight).to(h_pi.dtype) if ctx.needs_input_grad[0] else None
            grad_w = (dz.t().to(weight.dtype) @ h_pi.to(weight.dtype)) if ctx.needs_input_grad[1] else None
        return grad_h, grad_w, None, None, None, None, None, None


def _plain_linear(head):
    return type(head) is torch.nn.Linear and head.bias is None


def _project(head, hidden):
    """Logits with autocast off, in the head's own precision (fp32 in training): under bf16 autocast the projection
    would round the logits to bf16 before the log-softmax, a spurious per-token KL of about 1e-4 between identical
    heads."""
    weight = getattr(getattr(head, "base_layer", head), "weight", None)
    with torch.autocast(hidden.device.type, enabled=False):
        return head(hidden.to(weight.dtype) if weight is not None else hidden)


def sequence_terms(policy_hidden, reference_hidden, policy_head, reference_head, labels, mask, measure=None,
                   level=None, chunk_size=256, *, split_vocab=False, with_logps=False):
    """The memory-light path used for training: (logratio, kl, risk), each (N,), from final hidden states.

    policy_hidden / reference_hidden (N, T, H): hidden state at t predicts labels[:, t] (callers shift);
    policy_head / reference_head: the output projections (two, in case LoRA touches lm_head); mask (N, T) bool.
    Only masked-in positions are projected to the vocabulary, `chunk_size` positions at a time, so no (N, T, V)
    tensor is ever held: peak memory is O(chunk_size x V). With plain bias-free linear heads (the usual lm_head)
    each chunk's gradient is in closed form (_FusedChunk: only per-position scalars are kept, the projections are
    recomputed once in backward, no second sort); otherwise (LoRA on the head) the chunk is recomputed in backward
    under autograd (torch.utils.checkpoint). `measure=None` skips the risk term (returns risk=None), as plain DPO needs.
    `with_logps=True` adds a fourth output, sum_t log pi_theta(y_t | s_t), for logging.
    """
    if measure is not None:
        check_measure(measure, level)
    rows, cols = mask.nonzero(as_tuple=True)
    h_pi = policy_hidden[rows, cols]
    h_ref = reference_hidden[rows, cols].detach()
    y = labels[rows, cols]

    def chunk_terms(h_pi_c, h_ref_c, y_c):
        with torch.no_grad():
            ref_logits = _project(reference_head, h_ref_c)
        logp, ref_logp, kl, rho = _position_terms(_project(policy_head, h_pi_c), ref_logits, measure, level,
                                                  split_vocab, phi=_fast_measure)
        token_logp = logp.gather(-1, y_c[:, None]).squeeze(-1)
        logratio = token_logp - ref_logp.gather(-1, y_c[:, None]).squeeze(-1)
        return torch.stack([logratio, kl, rho if rho is not None else torch.zeros_like(kl), token_logp])

    fused = _plain_linear(policy_head) and _plain_linear(reference_head)  # else (LoRA on the head): checkpointing
    parts = []
    for start in range(0, h_pi.shape[0], chunk_size):
        sl = slice(start, start + chunk_size)
        if fused:
            parts.append(_FusedChunk.apply(h_pi[sl], policy_head.weight, h_ref[sl], reference_head.weight.detach(),
                                           y[sl], measure, level, split_vocab))
        elif torch.is_grad_enabled():
            parts.append(checkpoint(chunk_terms, h_pi[sl], h_ref[sl], y[sl], use_reentrant=False))
        else:
            parts.append(chunk_terms(h_pi[sl], h_ref[sl], y[sl]))
    n = mask.shape[0]
    per_pos = torch.cat(parts, dim=1) if parts else torch.zeros(4, 0, device=mask.device)
    sums = torch.zeros(4, n, dtype=per_pos.dtype, device=per_pos.device).index_add(1, rows, per_pos)
    out = (sums[0], sums[1], sums[2] if measure is not None else None)
    return out + (sums[3],) if with_logps else out
