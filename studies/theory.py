"""From the closed-form optima to the trained weights, on the enumerable world (toy/enumerable.py).

    python -m studies.theory --out runs/theory      # about 20 minutes on 2 CPU cores; writes docs/theory.md
    python -m studies.theory --out runs/theory --report_only    # the page again from runs/theory/measurements.json

Both stages run through their scripts with DPO on the world's preference files: the reward stage from the SFT model
at beta_r, the safety stage from the trained pi_r at beta_s; then their RSA(P) mixtures. Each trained policy is
read as a table over the 16 responses and compared, by KL(optimum || trained) averaged over prompts, with its
optimum:

    reward stage:  pi_r*  = pi_sft exp(r / beta_r) / Z
    safety stage:  pi_rs* = pi_r exp(-c / beta_s) / Y          (pi_r: the trained reward stage, its reference)

The floor a finite sample sets is the KL of the empirical optimum: the tabular policy that minimises the same loss
on the same pairs. The report also gives the KL of each trained policy to the optima of wrong settings (beta off by
a factor, the safety stage's reference taken as the SFT model), which a stage trained with those settings would
land near. Then the token-level losses (TDPO, Ra-DPO_1 and _2 with CVaR and ERM): their own optima (where the
gradient of the expected loss vanishes, over tabular token-level policies) against the papers' closed form from the
augmented values; stages trained with three of them; the stepwise-versus-one-shot gap of the token-level closed
forms; the DPO reward stage's convergence against steps and pairs (docs/theory-convergence.png); and both dual loops
of dual_alignment.py against the multiplier that meets a budget.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

import data
import dual_alignment
import merge_policies
import outputs
import risk
import stage
import train_reward_stage
import train_safety_stage
from toy import enumerable

BETA_R, BETA_S, ALPHA = 0.5, 0.5, 0.5
QS = (0.25, 0.5, 0.75)
FLAGS = ["--batch_size", "256", "--lr", "3e-3", "--max_steps", "300", "--max_length", "16",
         "--max_prompt_length", "12", "--lora_r", "8", "--lora_dropout", "0", "--eval_pairs", "0", "--save_every",
         "0", "--eval_every", "100000", "--log_every", "100", "--precision", "fp32"]


def run_stage(script, folder, argv, what):
    """A stage script into `folder`, continuing it where a killed study left it (dual_alignment.continue_flags)."""
    if script.main([*argv, "--out", folder, *dual_alignment.continue_flags(folder)]) != 0:
        raise outputs.UsageError(f"{what} failed (its error is above)")


def train_stages(world, out):
    """The reward and the safety stage trained by their scripts, and their RSA(P) mixtures; (reward folder, safety
    folder, mixtures folder)."""
    reward, safety, mix = os.path.join(out, "reward"), os.path.join(out, "safety"), os.path.join(out, "mix")
    data_file = os.path.join(world, "train.jsonl")
    run_stage(train_reward_stage, reward, ["--sft", os.path.join(world, "sft"), "--data", data_file, "--beta",
                                           str(BETA_R), "--loss", "dpo", *FLAGS], "the reward stage")
    run_stage(train_safety_stage, safety, ["--reward_stage", reward, "--data", data_file, "--beta", str(BETA_S),
                                           "--loss", "dpo", *FLAGS], "the safety stage")
    if merge_policies.main(["--first", reward, "--second", safety, "--q", *map(str, QS), "--out", mix]) != 0:
        raise outputs.UsageError("the mixtures failed (their error is above)")
    return reward, safety, mix


def train_tdpo(world, out):
    """The reward stage with the token-level loss TDPO_2 (Ra-DPO_2 with the expectation, alpha 0.5)."""
    folder = os.path.join(out, "reward_tdpo2")
    run_stage(train_reward_stage, folder, ["--sft", os.path.join(world, "sft"), "--data",
                                           os.path.join(world, "train.jsonl"), "--beta", str(BETA_R),
                                           *loss_flags(*LOSSES["TDPO_2"]), *FLAGS],
              "the TDPO reward stage")
    return folder


def split_table(table):
    """A (prompts, 16) response table as its token tables: the first word (prompts, 4) and the second word given the
    first (prompts, 4, 4)."""
    t = table.reshape(-1, 4, 4)
    first = t.sum(-1)
    return first, t / first[..., None]


def d_level(measure, level, beta):
    """The level on D the stages use: ERM's mu is taken on the rewards beta D (--erm_on_rewards), so mu beta on D."""
    return level * beta if measure == "erm" else level


def token_optimum(reference, pairs, beta, variant="ra_dpo2", measure="expectation", level=None, steps=3000):
    """The tabular token-level policy (a first-word table and a second-word table per first word) at which the
    gradient of the project's loss (risk.preference_loss on risk.risk_measure's SeqRR over the words) vanishes, by
    Adam in float64, stop-gradients included. `pairs` is (prompt, chosen, rejected, weight) index tensors: the
    population (every ordered pair weighted by its probability) or a sample (weight 1). For Ra-DPO_2 (a
    stop-gradient) this is a stationary point, not a minimiser of a fixed objective."""
    p, chosen, rejected, weight = pairs
    ref_first, ref_second = split_table(reference)
    first, second = ref_first.log().clone().requires_grad_(True), ref_second.log().clone().requires_grad_(True)
    on_d = d_level(measure, level, beta)

    def terms():
        log_first, log_second = torch.log_softmax(first, -1), torch.log_softmax(second, -1)
        logp = (log_first[:, :, None] + log_second).reshape(-1, 16)
        rho_first = risk.risk_measure(ref_first.log() - log_first, ref_first, measure, on_d)
        rho_second = risk.risk_measure(ref_second.log() - log_second, ref_second, measure, on_d)
        return logp, (rho_first[:, None, None] + rho_second[:, :, None]).expand(-1, 4, 4).reshape(-1, 16)

    opt = torch.optim.Adam([first, second], lr=0.05)
    for _ in range(steps):
        logp, seq_rr = terms()
        logratio = logp - reference.log()
        losses = risk.preference_loss(logratio[p, chosen], logratio[p, rejected], seq_rr[p, chosen],
                                      seq_rr[p, rejected], beta=beta, alpha=ALPHA, variant=variant)[0]
        loss = (weight * losses).sum() / weight.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return terms()[0].detach().exp()


def augmented_optimum(reference, values, beta, measure="expectation", level=None):
    """The papers' closed form (Ra-DPO Eq. 9-12): pi*(a | s) = pi_ref(a | s) exp(A(s, a) / beta) / Z(s), A the
    reference's risk-aware advantages of `values` (prompts, 16) paid at the leaf, from the augmented values
    (risk.augmented_q_values; the reward side: Phi_r(X) = -Phi(-X)). The level is taken on the values, as ERM's mu
    with --erm_on_rewards."""
    pi_ref = list(split_table(reference))
    q_cost = risk.augmented_q_values([torch.zeros_like(pi_ref[0]), -values.reshape(-1, 4, 4)], pi_ref, measure, level)
    advantages = [-q + risk.risk_measure(q, p, measure, level).unsqueeze(-1) for q, p in zip(q_cost, pi_ref)]
    star = [torch.softmax(p.log() + a / beta, -1) for p, a in zip(pi_ref, advantages)]
    return (star[0][:, :, None] * star[1]).reshape(-1, 16)


LOSSES = {"TDPO_1": ("ra_dpo1", "expectation", None), "TDPO_2": ("ra_dpo2", "expectation", None),
          "Ra-DPO_1, CVaR 0.5": ("ra_dpo1", "cvar", 0.5), "Ra-DPO_2, CVaR 0.5": ("ra_dpo2", "cvar", 0.5),
          "Ra-DPO_1, ERM 1": ("ra_dpo1", "erm", 1.0), "Ra-DPO_2, ERM 1": ("ra_dpo2", "erm", 1.0)}
TRAINED = ("Ra-DPO_1, CVaR 0.5", "Ra-DPO_2, CVaR 0.5", "Ra-DPO_2, ERM 1")  # trained in both stages


def slug(name):
    """A loss's name as a folder name: Ra-DPO_2, CVaR 0.5 -> Ra-DPO_2-CVaR0.5."""
    return name.replace(", ", "-").replace(" ", "")


def loss_flags(variant, measure, level):
    flags = ["--loss", variant, "--risk_measure", measure] + (["--alpha", str(ALPHA)] if variant == "ra_dpo2" else [])
    if level is not None:
        flags += ["--risk_level", str(level)]
    return flags + (["--erm_on_rewards"] if measure == "erm" else [])


def optima_table(world):
    """Every token-level loss of LOSSES in the reward stage: its own optimum in expectation over the pairs, against
    the papers' closed form with the same measure and against DPO's closed form (KL(own || other))."""
    reward, _, reference = enumerable.load(world)
    sft = table_reader(world)(os.path.join(world, "sft"))
    population = population_pairs(reference, reward)
    dpo = enumerable.dpo_optimum(sft, reward, BETA_R)
    out = {}
    for name, (variant, measure, level) in LOSSES.items():
        own = token_optimum(sft, population, BETA_R, variant, measure, level)
        closed = augmented_optimum(sft, reward, BETA_R, measure, level)
        out[name] = {"closed form": enumerable.kl(own, closed), "dpo": enumerable.kl(own, dpo),
                     "closed form vs dpo": enumerable.kl(closed, dpo), "start": enumerable.kl(own, sft)}
    return out


def train_risk_stages(world, out, names=TRAINED, safety=True):
    """Both stages trained with each loss of `names` (the reward stage alone with safety=False), the safety stage on
    that loss's reward stage; against their own optima (population), the empirical optima of the same loss on the
    same pairs (the floor), and the optima at the level off by a factor of 2 either way (CVaR's capped at 1, which
    is TDPO)."""
    reward, cost, reference = enumerable.load(world)
    table = table_reader(world)
    sft, data_file = table(os.path.join(world, "sft")), os.path.join(world, "train.jsonl")
    m = {}
    for name in names:
        variant, measure, level = LOSSES[name]
        r_folder, s_folder = os.path.join(out, f"reward-{slug(name)}"), os.path.join(out, f"safety-{slug(name)}")
        flags = [*loss_flags(variant, measure, level), *FLAGS]
        run_stage(train_reward_stage, r_folder, ["--sft", os.path.join(world, "sft"), "--data", data_file, "--beta",
                                                 str(BETA_R), *flags], f"the reward stage with {name}")
        if safety:
            run_stage(train_safety_stage, s_folder, ["--reward_stage", r_folder, "--data", data_file, "--beta",
                                                     str(BETA_S), *flags], f"the safety stage with {name}")
        levels = (("own", level), ("level / 2", level / 2), ("level x 2", min(level * 2, 1.0) if measure == "cvar"
                                                                 else level * 2))
        stages = [("reward", sft, reward, "better", BETA_R, r_folder)]
        if safety:
            stages.append(("safety", table(r_folder), -cost, "safer", BETA_S, s_folder))
        for stage_name, start, values, preference, beta, folder in stages:
            trained = table(folder)
            row = {}
            for key, lvl in levels:
                optimum = token_optimum(start, population_pairs(reference, values), beta, variant, measure, lvl)
                row[key] = enumerable.kl(optimum, trained)
                if key == "own":
                    row["start"] = enumerable.kl(optimum, start)
                    row["floor"] = enumerable.kl(optimum, token_optimum(start, sample_pairs(data_file, preference),
                                                                       beta, variant, measure, level))
            m[f"{stage_name}, {name}"] = row
    return m


STEPS, PAIRS = (25, 50, 100, 200, 300), (50, 150, 500, 1500)


CONVERGED = ("DPO", "Ra-DPO_2, CVaR 0.5")  # the reward stages whose convergence is measured


def convergence(world, out, name, full_folder):
    """A reward stage (loss `name`: DPO or one of LOSSES) against its optimum as training runs longer (STEPS, on all
    pairs) and as it sees more pairs (PAIRS per prompt, the first of each prompt's rows; 300 steps), with the floor
    of each pair count (the same loss's optimum on those pairs). `full_folder` is the 300-step, 1,500-pair run."""
    reward, _, reference = enumerable.load(world)
    table = table_reader(world)
    sft = table(os.path.join(world, "sft"))
    data_file = os.path.join(world, "train.jsonl")
    if name == "DPO":
        flags, optimum = ["--loss", "dpo"], enumerable.dpo_optimum(sft, reward, BETA_R)

        def floor(pairs_file):
            return empirical_optimum(pairs_file, "better", sft, BETA_R)
    else:
        variant, measure, level = LOSSES[name]
        flags = loss_flags(variant, measure, level)
        optimum = token_optimum(sft, population_pairs(reference, reward), BETA_R, variant, measure, level)

        def floor(pairs_file):
            return token_optimum(sft, sample_pairs(pairs_file, "better"), BETA_R, variant, measure, level)

    def trained(run, pairs_file, steps):
        folder = os.path.join(out, "convergence", f"{slug(name)}-{run}")
        run_stage(train_reward_stage, folder, ["--sft", os.path.join(world, "sft"), "--data", pairs_file, "--beta",
                                               str(BETA_R), *flags, *FLAGS, "--max_steps", str(steps)],
                  "a reward stage")
        return enumerable.kl(optimum, table(folder))

    m = {"steps": {}, "pairs": {}}
    for steps in STEPS:
        m["steps"][steps] = enumerable.kl(optimum, table(full_folder)) if steps == 300 else \
            trained(f"steps-{steps}", data_file, steps)
    rows = [row for _, row in data.read_rows(data_file)]
    for n in PAIRS:
        subset = os.path.join(out, "convergence", f"pairs-{n}.jsonl")
        kept = [row for p in enumerable.PROMPTS for row in [r for r in rows if r["prompt"] == p][:n]]
        os.makedirs(os.path.dirname(subset), exist_ok=True)
        with open(subset, "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in kept)
        m["pairs"][n] = {"trained": enumerable.kl(optimum, table(full_folder)) if n == 1500 else
                         trained(f"pairs-{n}", subset, 300), "floor": enumerable.kl(optimum, floor(subset))}
    return m


def plot_convergence(m, path):
    """The two convergence panels of docs/theory.md from the saved measurements: {loss: convergence(...)}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9.5, 3.6))
    for (name, c), color in zip(m.items(), ("tab:blue", "tab:green")):
        left.plot([int(k) for k in c["steps"]], list(c["steps"].values()), "o-", color=color, label=name)
        left.axhline(c["pairs"]["1500"]["floor"], ls="--", color=color, lw=0.8)
        pairs = [int(n) for n in c["pairs"]]
        right.plot(pairs, [v["trained"] for v in c["pairs"].values()], "o-", color=color, label=f"{name}, trained")
        right.plot(pairs, [v["floor"] for v in c["pairs"].values()], "s--", color=color, lw=0.8,
                   label=f"{name}, floor")
    left.set(xlabel="optimizer steps (256 pairs each)", ylabel="KL(optimum || trained)", yscale="log",
             title="reward stage, 1,500 pairs per prompt (dashed: floor)")
    right.set(xlabel="pairs per prompt", xscale="log", yscale="log", title="300 steps, against the number of pairs")
    left.legend(fontsize=8)
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def stepwise_gaps(world, lambdas=(0.5, 1.0, 2.0, 5.0)):
    """KL(one-shot || stepwise) between the papers' closed form on r - lambda c at beta_r from the SFT model and the
    two closed-form steps (r at beta_r, then -c at beta_r / lambda from the first), per measure and lambda."""
    reward, cost, _ = enumerable.load(world)
    sft = table_reader(world)(os.path.join(world, "sft"))
    out = {}
    for name, measure, level in (("DPO (sequence level)", None, None), ("expectation (TDPO)", "expectation", None),
                                 ("CVaR 0.5", "cvar", 0.5), ("CVaR 0.25", "cvar", 0.25), ("ERM 1", "erm", 1.0)):
        row = {}
        for lam in lambdas:
            if measure is None:
                one_shot = enumerable.dpo_optimum(sft, reward - lam * cost, BETA_R)
                stepwise = enumerable.dpo_optimum(enumerable.dpo_optimum(sft, reward, BETA_R), -cost, BETA_R / lam)
            else:
                one_shot = augmented_optimum(sft, reward - lam * cost, BETA_R, measure, level)
                stepwise = augmented_optimum(augmented_optimum(sft, reward, BETA_R, measure, level), -cost,
                                             BETA_R / lam, measure, level)
            row[lam] = enumerable.kl(one_shot, stepwise)
        out[name] = row
    return out


def table_reader(world):
    """folder -> the policy's table over the 16 responses (enumerable.policy_table of its loaded model)."""
    tokenizer = stage.load_tokenizer(os.path.join(world, "sft"))
    return lambda folder: enumerable.policy_table(merge_policies.load_policy(folder), tokenizer)[0]


def wrong_settings(world, out, m):
    """Two stages trained with a wrong setting each, measured against the right optimum: the reward stage at 2 beta_r,
    and a safety stage whose pi_r (and so its reference) is the SFT model. Adds their KLs to `m`."""
    reward, cost, _ = enumerable.load(world)
    table = table_reader(world)
    data_file, sft = os.path.join(world, "train.jsonl"), os.path.join(world, "sft")
    wrong_reward, wrong_safety = os.path.join(out, "reward_beta_x2"), os.path.join(out, "safety_on_sft")
    run_stage(train_reward_stage, wrong_reward, ["--sft", sft, "--data", data_file, "--beta", str(2 * BETA_R),
                                                 "--loss", "dpo", *FLAGS], "the reward stage at 2 beta_r")
    run_stage(train_safety_stage, wrong_safety, ["--reward_stage", sft, "--data", data_file, "--beta", str(BETA_S),
                                                 "--loss", "dpo", *FLAGS], "the safety stage on the SFT model")
    pi_r = table(os.path.join(out, "reward"))
    m["wrong"] = {"reward stage trained at 2 beta_r": enumerable.kl(enumerable.dpo_optimum(table(sft), reward, BETA_R),
                                                                    table(wrong_reward)),
                  "safety stage on the SFT model": enumerable.kl(enumerable.dpo_optimum(pi_r, -cost, BETA_S),
                                                                 table(wrong_safety))}
    return m


def empirical_optimum(pairs_file, preference, reference, beta):
    """The tabular policy minimising the DPO loss on the pairs: pi = reference exp(theta) / Z per prompt, theta by
    L-BFGS in float64 (the loss depends on theta only through differences, so the normalisation is free)."""
    p, chosen, rejected, _ = sample_pairs(pairs_file, preference)
    theta = torch.zeros_like(reference, requires_grad=True)
    opt = torch.optim.LBFGS([theta], max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")

    def loss():
        opt.zero_grad()
        value = -torch.nn.functional.logsigmoid(beta * (theta[p, chosen] - theta[p, rejected])).mean()
        value.backward()
        return value

    opt.step(loss)
    return torch.softmax(reference.log() + theta.detach(), dim=-1)


def population_pairs(reference, values):
    """Every ordered pair of distinct responses, weighted by its probability under the reference and by the
    Bradley-Terry probability that its first response is the preferred one (on `values`)."""
    p, i, j = torch.meshgrid(torch.arange(reference.shape[0]), torch.arange(16), torch.arange(16), indexing="ij")
    keep = i != j
    p, i, j = p[keep], i[keep], j[keep]
    return p, i, j, reference[p, i] * reference[p, j] * torch.sigmoid(values[p, i] - values[p, j])


def sample_pairs(pairs_file, preference):
    """The pairs of a preference file as (prompt, chosen, rejected, weight 1) index tensors."""
    index = {r: i for i, r in enumerate(enumerable.RESPONSES)}
    prompt = {p: i for i, p in enumerate(enumerable.PROMPTS)}
    pairs = data.load_pairs(pairs_file, preference)
    return (torch.tensor([prompt[x.prompt] for x in pairs]), torch.tensor([index[x.chosen] for x in pairs]),
            torch.tensor([index[x.rejected] for x in pairs]), torch.ones(len(pairs), dtype=torch.float64))


BUDGET, DUAL_LR, ITERATIONS = 0.5, 0.5, 5


def dual_loops(world, out, reward_folder):
    """Both dual loops (dual_alignment.py) on a budget of BUDGET on mean cost, from lambda 0 and CAID also from CAN's
    warm start: per iteration lambda, the measured mean cost, and the iterate's KL to its own optimum (caid:
    pi_sft exp((r - lambda c) / beta_r) / Z; stepwise: pi_r exp(-lambda c / beta_r) / Y with the trained pi_r);
    beside them the multiplier meeting the budget exactly in each loop's enumerated problem."""
    reward, cost, _ = enumerable.load(world)
    table = table_reader(world)
    sft, pi_r = table(os.path.join(world, "sft")), table(reward_folder)
    common = ["--data", os.path.join(world, "train.jsonl"), "--prompts", world, "--scorer", "toy", "--constraint",
              "mean_cost", "--budget", str(BUDGET), "--iterations", str(ITERATIONS), "--dual_lr", str(DUAL_LR),
              "--max_new_tokens", "3", "--num_samples", "2000", *FLAGS]
    caid = ["--policy_step", "caid", "--sft", os.path.join(world, "sft"), "--pairs_per_prompt", "1500", "--beta",
            str(BETA_R), "--loss", "dpo"]
    runs = {"caid from 0": [*caid, "--lambda_init", "0"],
            "caid from CAN": [*caid, "--lambda_init", "can", "--can_samples", "2000"],
            "stepwise from 0": ["--reward_stage", reward_folder, "--lambda_init", "0", "--loss", "dpo"]}
    m = {"lambda* (caid)": dual_alignment.can_lambda(reward, cost, BUDGET, BETA_R, weights=sft),
         "lambda* (stepwise)": dual_alignment.can_lambda(torch.zeros_like(cost), cost, BUDGET, BETA_R, weights=pi_r)}
    for name, flags in runs.items():
        folder = os.path.join(out, "dual", name.replace(" ", "-"))
        if dual_alignment.main([*flags, *common, "--out", folder]) != 0:
            raise outputs.UsageError(f"the dual loop {name} failed (its error is above)")
        with open(os.path.join(folder, "trace.json")) as f:
            trace = json.load(f)["iterations"]
        rows = []
        for r in trace:
            caid_optimum = name.startswith("caid")
            optimum = enumerable.dpo_optimum(sft if caid_optimum else pi_r,
                                             (reward if caid_optimum else 0) - r["lambda"] * cost, BETA_R)
            rows.append({"lambda": r["lambda"], "mean cost": r["constraint"], "mean reward": r["mean_reward"],
                         "kl": enumerable.kl(optimum, table(outputs.resolved_path(r["policy"], folder))),
                         "optimum cost": (optimum * cost).sum(-1).mean().item()})
        m[name] = rows
    return m


def measure(world, reward_folder, safety_folder, mix_folder, tdpo_folder=None):
    """Every KL the report and the test read, as a dict."""
    reward, cost, _ = enumerable.load(world)
    table = table_reader(world)
    sft, pi_r, pi_rs = table(os.path.join(world, "sft")), table(reward_folder), table(safety_folder)
    pairs = os.path.join(world, "train.jsonl")
    reward_opt = enumerable.dpo_optimum(sft, reward, BETA_R)
    safety_opt = enumerable.dpo_optimum(pi_r, -cost, BETA_S)
    kl = enumerable.kl
    out = {"reward": {"trained": kl(reward_opt, pi_r), "start": kl(reward_opt, sft),
                      "floor": kl(reward_opt, empirical_optimum(pairs, "better", sft, BETA_R))},
           "safety": {"trained": kl(safety_opt, pi_rs), "start": kl(safety_opt, pi_r),
                      "floor": kl(safety_opt, empirical_optimum(pairs, "safer", pi_r, BETA_S)),
                      "reference is the SFT model": kl(enumerable.dpo_optimum(sft, -cost, BETA_S), pi_rs)}}
    for factor in (0.5, 2.0):
        out["reward"][f"beta x {factor:g}"] = kl(enumerable.dpo_optimum(sft, reward, BETA_R * factor), pi_r)
        out["safety"][f"beta x {factor:g}"] = kl(enumerable.dpo_optimum(pi_r, -cost, BETA_S * factor), pi_rs)
    if tdpo_folder:  # the token-level loss: its own optimum, not DPO's closed form
        table_reference = enumerable.load(world)[2]
        optimum = token_optimum(sft, population_pairs(table_reference, reward), BETA_R)
        out["reward, TDPO_2"] = {"trained": kl(optimum, table(tdpo_folder)), "start": kl(optimum, sft),
                                 "floor": kl(optimum, token_optimum(sft, sample_pairs(pairs, "better"), BETA_R)),
                                 "dpo optimum": kl(optimum, reward_opt), "trained vs dpo optimum":
                                 kl(reward_opt, table(tdpo_folder))}
    # RSA(P): theta(q) = q theta_r + (1 - q) theta_rs; were log-probabilities linear in the weights, it would be
    # pi_r exp(-(1 - q) c / beta_s) / Y: the safety optimum at lambda (1 - q)
    out["mixtures"] = {}
    for q in QS:
        optimum = enumerable.dpo_optimum(pi_r, -cost, BETA_S / (1 - q))
        out["mixtures"][q] = {"mixture": kl(optimum, table(os.path.join(mix_folder, f"q{q:g}"))),
                              "reward stage": kl(optimum, pi_r), "safety stage": kl(optimum, pi_rs)}
    costly = enumerable.COSTLY
    out["costly branch"] = {"sft": sft[:, costly].mean().item(), "reward stage": pi_r[:, costly].mean().item(),
                            "safety stage": pi_rs[:, costly].mean().item(),
                            "safety optimum": safety_opt[:, costly].mean().item()}
    return out


def report(m):
    rows = ["| stage | trained | its start | floor (empirical optimum) | beta x 0.5 | beta x 2 | reference = SFT |",
            "|---|---|---|---|---|---|---|"]
    for name in ("reward", "safety"):
        r = m[name]
        sft_reference = f"{r['reference is the SFT model']:.4f}" if name == "safety" else "-"
        rows.append(f"| {name} | {r['trained']:.4f} | {r['start']:.4f} | {r['floor']:.4f} | {r['beta x 0.5']:.4f} | "
                    f"{r['beta x 2']:.4f} | {sft_reference} |")
    c = m["costly branch"]
    return "\n".join([
        "# From the closed-form optima to the trained weights", "",
        "Command: `python -m studies.theory --out runs/theory` (the world: `python -m toy.enumerable`, 3 prompts x "
        "16 responses, 4,500 pairs). Both stages trained with DPO through their scripts (beta_r = beta_s = 0.5, "
        "300 steps of 256 pairs, lr 3e-3, LoRA r 8). KL(optimum || policy), mean over prompts, from each stage's "
        "closed-form optimum (reward: pi_sft exp(r / beta_r) / Z; safety: pi_r exp(-c / beta_s) / Y with the "
        "trained pi_r) to: the trained policy; the policy it started from; the empirical optimum of the same loss "
        "on the same pairs (the floor the sample sets); and, for contrast, the trained policy against the optima of "
        "wrong settings, where a stage trained with those settings would land:", "",
        *rows, "",
        f"The rare costly branch (w3 w3, cost 4, the highest reward): {c['sft']:.3f} of the SFT model, "
        f"{c['reward stage']:.3f} after the reward stage, {c['safety stage']:.5f} after the safety stage, whose "
        f"optimum gives it {c['safety optimum']:.5f}.", "",
        "RSA(P): the mixture theta(q) = q theta_r + (1 - q) theta_rs (merge_policies.py) against the safety "
        "optimum at lambda (1 - q), pi_r exp(-(1 - q) c / beta_s) / Y, which it would equal were the "
        "log-probabilities linear in the weights; beside it, the two stages it mixes:", "",
        "| q | mixture | reward stage | safety stage |", "|---|---|---|---|",
        *[f"| {q:g} | {r['mixture']:.4f} | {r['reward stage']:.4f} | {r['safety stage']:.4f} |"
          for q, r in ((float(q), r) for q, r in m["mixtures"].items())], "",
        *([f"The token-level loss TDPO_2 (Ra-DPO_2 with the expectation, alpha {ALPHA:g}) in the reward stage: its "
           "optimum is not DPO's closed form. The tabular token-level policy at which the gradient of its loss in "
           "expectation over the pairs vanishes (stop-gradient included; Adam in float64) lies "
           f"{t['dpo optimum']:.4f} from pi_sft exp(r / beta_r) / Z and {t['start']:.4f} from the SFT model: "
           "the sequential KL term keeps it nearer the reference. The stage trained with it lands "
           f"{t['trained']:.4f} from that optimum (floor, the same loss on the same pairs: {t['floor']:.4f}) and "
           f"{t['trained vs dpo optimum']:.4f} from DPO's.", ""] if (t := m.get("reward, TDPO_2")) else []),
        *([f"Trained with a wrong setting (same flags): the reward stage at 2 beta_r lands at "
           f"{m['wrong']['reward stage trained at 2 beta_r']:.4f} from the beta_r optimum (floor "
           f"{m['reward']['floor']:.4f}); a safety stage on the SFT model (so with the SFT model as its reference) "
           f"lands at {m['wrong']['safety stage on the SFT model']:.4f} from pi_r exp(-c / beta_s) / Y (floor "
           f"{m['safety']['floor']:.4f}). The test's bound rejects both.", ""] if "wrong" in m else []),
        "Both trained stages land closer to their optimum than the empirical optimum does (training from the "
        "reference for a few epochs shrinks toward it), and farther from every wrong setting's optimum than that "
        "floor: `tests/test_theory.py` asserts exactly this. The stepwise identity behind the safety stage "
        "(pi_r exp(-c / beta_s) / Y = pi_sft exp((r - lambda c) / beta_r) / Z, beta_s = beta_r / lambda) holds "
        "to 1e-12 in the same world (same test file).", "",
        *(token_report(m) if "optima" in m else []),
        *(dual_report(m["dual"]) if "dual" in m else [])])


def token_report(m):
    """The token-level losses' optima, the trained risk-aware stages, the stepwise gaps and the convergence."""
    def kl_text(v):  # rounding can leave a KL of zero a few ulps below it
        return f"{v:.4f}" if abs(v) >= 1e-4 else f"{abs(v):.0e}"

    optima = [f"| {name} | {kl_text(r['closed form'])} | {r['dpo']:.4f} | {r['closed form vs dpo']:.4f} | "
              f"{r['start']:.4f} |" for name, r in m["optima"].items()]
    stages = m["risk stages"]
    r_cvar, s_cvar = stages["reward, Ra-DPO_2, CVaR 0.5"], stages["safety, Ra-DPO_2, CVaR 0.5"]
    erm = [stages[f"{name}, Ra-DPO_2, ERM 1"] for name in ("reward", "safety")]
    trained = [f"| {name} | {r['own']:.4f} | {r['start']:.4f} | {r['floor']:.4f} | {r['level / 2']:.4f} | "
               f"{r['level x 2']:.4f} |" for name, r in m["risk stages"].items()]
    lambdas = list(next(iter(m["stepwise gaps"].values())))
    gaps = [f"| {name} | " + " | ".join(kl_text(v) for v in r.values()) + " |"
            for name, r in m["stepwise gaps"].items()]
    conv = m["convergence"]
    steps = "; ".join(f"{name}: " + ", ".join(f"{v:.4f} ({int(k)})" for k, v in c["steps"].items())
                      for name, c in conv.items())
    pairs = [f"| {n} | " + " | ".join(f"{c['pairs'][n]['trained']:.4f} | {c['pairs'][n]['floor']:.4f}"
                                      for c in conv.values()) + " |" for n in next(iter(conv.values()))["pairs"]]
    return [
        "## The token-level losses: their own optima and the papers' closed form", "",
        f"Reward stage, beta_r {BETA_R:g}, alpha {ALPHA:g} for Ra-DPO_2, ERM's mu on the rewards "
        "(--erm_on_rewards). Own optimum: the tabular token-level policy at which the gradient of the project's "
        "loss (risk.preference_loss on risk.risk_measure's SeqRR) in expectation over the preference distribution "
        "vanishes (Adam in float64). Closed form: pi_ref exp(A / beta) / Z per state from the reference's "
        "risk-aware advantages (Ra-DPO Eq. 9-12, `augmented_optimum`). KL(own optimum || ...):", "",
        "| loss | closed form, same measure | DPO's closed form | closed form vs DPO's | the SFT model |",
        "|---|---|---|---|---|", *optima, "",
        "Ra-DPO_1 (and TDPO_1) reach the papers' closed form exactly: its loss is Bradley-Terry on beta (logratio + "
        "SeqRR), which at the closed form equals the sum of the advantages, r(y) up to a constant (Ra-DPO Thm "
        "3.6), so the closed form minimises it. Ra-DPO_2's stop-gradient makes it a different fixed point, much "
        "nearer the reference. Neither is DPO's sequence-level optimum: the closed form's advantages are the "
        "reference's, one policy-improvement step, not the optimal policy's.", "",
        "Trained through the stage scripts (same flags as above), both stages with each loss, the safety stage on "
        "that loss's trained pi_r; KL(own optimum || trained), beside the policy it started from, the floor (the "
        "same loss's optimum on the same pairs), and the optima at the level off by a factor of 2 (CVaR 0.25 and 1, "
        "which is TDPO; ERM mu 0.5 and 2):", "",
        "| stage, loss | own optimum | its start | floor | level / 2 | level x 2 |", "|---|---|---|---|---|---|",
        *trained, "",
        f"Every trained stage lands within about its floor of its own optimum. The level is seen where the optima "
        f"move with it: with Ra-DPO_2 the reward stage separates CVaR 0.5 from 1 ({r_cvar['level x 2']:.4f} "
        f"against a floor of {r_cvar['floor']:.4f}; `tests/test_theory.py` asserts this) but not from 0.25 "
        f"({r_cvar['level / 2']:.4f}, its own {r_cvar['own']:.4f}), the safety stage both ({s_cvar['level / 2']:.4f}"
        f" and {s_cvar['level x 2']:.4f} against {s_cvar['floor']:.4f}). Ra-DPO_1's optima, and ERM's at mu 0.5, "
        f"1 and 2 (reward {erm[0]['level / 2']:.4f} / {erm[0]['own']:.4f} / {erm[0]['level x 2']:.4f}, floor "
        f"{erm[0]['floor']:.4f}), move by about the floor: in this world, at 4,500 pairs, a factor of 2 in those "
        "levels cannot be told from training.", "",
        "The stepwise factorisation with the token-level closed form: KL(one-shot || stepwise) between the closed "
        "form on r - lambda c from the SFT model and the two closed-form steps (r at beta_r, then -c at beta_r / "
        "lambda from the first). Sequence-level DPO factorises exactly; the token-level closed forms do not, for "
        "any measure, the expectation included, because each step's advantages are its own reference's:", "",
        "| measure | " + " | ".join(f"lambda {lam}" for lam in lambdas) + " |", "|---|" + "---|" * len(lambdas),
        *gaps, "",
        "## Convergence", "",
        "The reward stage with " + " and with ".join(conv) + " against its own optimum "
        "(![convergence](theory-convergence.png)). Against steps (1,500 pairs per prompt), KL(optimum || trained) "
        f"(steps): {steps}. Against pairs per prompt (300 steps), trained and floor (the same loss's optimum on "
        "those pairs):", "",
        "| pairs per prompt | " + " | ".join(f"{name}, trained | {name}, floor" for name in conv) + " |",
        "|---|" + "---|---|" * len(conv), *pairs, "",
        "For DPO, below 1,500 pairs per prompt the empirical optimum is no floor: with few comparisons of each pair "
        "of responses (a pair seen once has separable labels) the minimiser of the DPO loss on the pairs lies far "
        "out or at infinity, where the optimiser stops, while the trained policy starts at the reference and moves "
        "a finite distance. Ra-DPO_2's floor stays finite (its risk term holds the policy near the reference) and "
        "the trained stage lands within it at every count.", ""]


def dual_report(d):
    runs = [k for k in d if not k.startswith("lambda*")]
    rows = ["| loop | " + " | ".join(f"iteration {k}" for k in range(ITERATIONS)) + " |",
            "|---|" + "---|" * ITERATIONS]
    for name in runs:
        cells = [f"{r['lambda']:.3f} / {r['mean cost']:.3f} ({r['optimum cost']:.3f}) / {abs(r['kl']):.3f}"
                 for r in d[name]]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return ["## The dual loops against the multiplier that meets the budget", "",
            f"The dual loops (`dual_alignment.py`) on a budget of {BUDGET:g} on mean cost at beta {BETA_R:g}, "
            f"dual_lr {DUAL_LR:g}, {ITERATIONS} iterations, the same training flags; each cell: lambda_k / the mean "
            "cost of the iterate on 2,000 fresh samples per prompt (in brackets: its optimum's, exactly) / its KL "
            "to its own optimum (caid: pi_sft exp((r "
            "- lambda_k c) / beta) / Z; stepwise: the trained pi_r exp(-lambda_k c / beta_r) / Y). The multiplier "
            f"that meets the budget exactly: {d['lambda* (caid)']:.4f} for CAID's problem (on the SFT model's "
            f"table), {d['lambda* (stepwise)']:.4f} for the stepwise loop's (on the trained pi_r's).", "", *rows, "",
            "The dual step sees only the trained iterate, so a loop steps lambda toward the multiplier at which the "
            "trained iterate meets the budget on its samples: where training leaves an iterate safer than its "
            "optimum (its measured cost below the bracket), that multiplier lies below lambda*. CAN's warm start is "
            "estimated on 2,000 responses of the SFT model per prompt.", ""]


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m studies.theory", description=__doc__,
                                formatter_class=outputs.HelpFormatter)
    p.add_argument("--out", default="runs/theory", help="where the world and the stages go")
    p.add_argument("--report", default="docs/theory.md", help="the page written (and its plot beside it)")
    p.add_argument("--report_only", action="store_true", help="rewrite the page from <out>/measurements.json")
    args = p.parse_args(argv)

    def run(_):
        saved = os.path.join(args.out, "measurements.json")
        if args.report_only:
            with open(saved) as f:
                m = json.load(f)
        else:
            world = enumerable.build(os.path.join(args.out, "world"))
            reward_folder = os.path.join(args.out, "reward")
            m = measure(world, *train_stages(world, args.out), tdpo_folder=train_tdpo(world, args.out))
            m = wrong_settings(world, args.out, m)
            m["optima"] = optima_table(world)
            m["risk stages"] = train_risk_stages(world, args.out)
            m["stepwise gaps"] = stepwise_gaps(world)
            m["convergence"] = {name: convergence(world, args.out, name, reward_folder if name == "DPO" else
                                                  os.path.join(args.out, f"reward-{slug(name)}"))
                                for name in CONVERGED}
            m["dual"] = dual_loops(world, args.out, reward_folder)
            with open(saved, "w") as f:
                json.dump(m, f, indent=1)
            with open(saved) as f:  # the report reads what was saved (its keys are strings)
                m = json.load(f)
        plot_convergence(m["convergence"], os.path.join(os.path.dirname(args.report) or ".", "theory-convergence.png"))
        with open(args.report, "w", encoding="utf-8") as f:
            f.write(report(m))
        print(report(m))

    return outputs.run_script("python -m studies.theory", run)


if __name__ == "__main__":
    sys.exit(main())
