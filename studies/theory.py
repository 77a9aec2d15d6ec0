"""From the closed-form optima to the trained weights, on the enumerable world (toy/enumerable.py).

    python -m studies.theory --out runs/theory      # about 5 minutes on 2 CPU cores; writes docs/theory.md

Both stages run through their scripts with DPO on the world's preference files: the reward stage from the SFT model
at beta_r, the safety stage from the trained pi_r at beta_s; then their RSA(P) mixtures, and a reward stage with the
token-level loss TDPO_2, whose optimum is found by gradient descent on its expected loss over tabular policies.
Each trained policy is read as a table over the 16 responses and compared, by KL(optimum || trained) averaged over
prompts, with its optimum:

    reward stage:  pi_r*  = pi_sft exp(r / beta_r) / Z
    safety stage:  pi_rs* = pi_r exp(-c / beta_s) / Y          (pi_r: the trained reward stage, its reference)

The floor a finite sample sets is the KL of the empirical optimum: the tabular policy that minimises the same DPO
loss on the same pairs (float64, L-BFGS). The report also gives the KL of each trained policy to the optima of
wrong settings (beta off by a factor, the safety stage's reference taken as the SFT model), which a stage trained
with those settings would land near.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

import data
import merge_policies
import outputs
import stage
import train_reward_stage
import train_safety_stage
from toy import enumerable

BETA_R, BETA_S, ALPHA = 0.5, 0.5, 0.5
QS = (0.25, 0.5, 0.75)
FLAGS = ["--batch_size", "256", "--lr", "3e-3", "--max_steps", "300", "--max_length", "16",
         "--max_prompt_length", "12", "--lora_r", "8", "--lora_dropout", "0", "--eval_pairs", "0", "--save_every",
         "0", "--eval_every", "100000", "--log_every", "100", "--precision", "fp32"]


def train_stages(world, out):
    """The reward and the safety stage trained by their scripts, and their RSA(P) mixtures; (reward folder, safety
    folder, mixtures folder)."""
    reward, safety, mix = os.path.join(out, "reward"), os.path.join(out, "safety"), os.path.join(out, "mix")
    data_file = os.path.join(world, "train.jsonl")
    if train_reward_stage.main(["--sft", os.path.join(world, "sft"), "--data", data_file, "--beta", str(BETA_R),
                                "--loss", "dpo", "--out", reward, *FLAGS]) != 0:
        raise outputs.UsageError("the reward stage failed (its error is above)")
    if train_safety_stage.main(["--reward_stage", reward, "--data", data_file, "--beta", str(BETA_S), "--loss", "dpo",
                                "--out", safety, *FLAGS]) != 0:
        raise outputs.UsageError("the safety stage failed (its error is above)")
    if merge_policies.main(["--first", reward, "--second", safety, "--q", *map(str, QS), "--out", mix]) != 0:
        raise outputs.UsageError("the mixtures failed (their error is above)")
    return reward, safety, mix


def train_tdpo(world, out):
    """The reward stage with the token-level loss TDPO_2 (Ra-DPO_2 with the expectation, alpha 0.5)."""
    folder = os.path.join(out, "reward_tdpo2")
    if train_reward_stage.main(["--sft", os.path.join(world, "sft"), "--data", os.path.join(world, "train.jsonl"),
                                "--beta", str(BETA_R), "--loss", "ra_dpo2", "--risk_measure", "expectation",
                                "--alpha", str(ALPHA), "--out", folder, *FLAGS]) != 0:
        raise outputs.UsageError("the TDPO reward stage failed (its error is above)")
    return folder


def tdpo_optimum(reference, pairs, beta, alpha, steps=3000):
    """The tabular token-level policy (a first-word table and a second-word table per first word) at which the
    gradient of TDPO_2's loss vanishes, found by Adam on that loss (its stop-gradient on the chosen response's
    sequential KL included). `pairs` is (prompt, chosen, rejected, weight) index tensors: the population (every
    ordered pair weighted by its probability) or a sample (weight 1)."""
    p, chosen, rejected, weight = pairs
    ref = reference.reshape(-1, 4, 4)
    ref_first, ref_second = ref.sum(-1), ref / ref.sum(-1, keepdim=True)
    first, second = ref_first.log().clone().requires_grad_(True), ref_second.log().clone().requires_grad_(True)

    def terms():
        log_first, log_second = torch.log_softmax(first, -1), torch.log_softmax(second, -1)
        logp = (log_first[:, :, None] + log_second).reshape(-1, 16)
        kl_first = (ref_first * (ref_first.log() - log_first)).sum(-1)
        kl_second = (ref_second * (ref_second.log() - log_second)).sum(-1)
        return logp, (kl_first[:, None, None] + kl_second[:, :, None]).expand(-1, 4, 4).reshape(-1, 16)

    opt = torch.optim.Adam([first, second], lr=0.05)
    for _ in range(steps):
        logp, seq_kl = terms()
        logratio = logp - reference.log()
        z = beta * (logratio[p, chosen] - logratio[p, rejected]) \
            - alpha * beta * (seq_kl[p, rejected] - seq_kl[p, chosen].detach())
        loss = -(weight * torch.nn.functional.logsigmoid(z)).sum() / weight.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return terms()[0].detach().exp()


def table_reader(world):
    """folder -> the policy's table over the 16 responses (enumerable.policy_table of its loaded model)."""
    tokenizer = stage.load_tokenizer(os.path.join(world, "sft"))
    return lambda folder: enumerable.policy_table(stage.load_policy(folder), tokenizer)[0]


def wrong_settings(world, out, m):
    """Two stages trained with a wrong setting each, measured against the right optimum: the reward stage at 2 beta_r,
    and a safety stage whose pi_r (and so its reference) is the SFT model. Adds their KLs to `m`."""
    reward, cost, _ = enumerable.load(world)
    table = table_reader(world)
    data_file, sft = os.path.join(world, "train.jsonl"), os.path.join(world, "sft")
    wrong_reward, wrong_safety = os.path.join(out, "reward_beta_x2"), os.path.join(out, "safety_on_sft")
    if train_reward_stage.main(["--sft", sft, "--data", data_file, "--beta", str(2 * BETA_R), "--loss", "dpo",
                                "--out", wrong_reward, *FLAGS]) != 0 or \
            train_safety_stage.main(["--reward_stage", sft, "--data", data_file, "--beta", str(BETA_S), "--loss",
                                     "dpo", "--out", wrong_safety, *FLAGS]) != 0:
        raise outputs.UsageError("a stage failed (its error is above)")
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
        optimum = tdpo_optimum(sft, population_pairs(table_reference, reward), BETA_R, ALPHA)
        out["reward, TDPO_2"] = {"trained": kl(optimum, table(tdpo_folder)), "start": kl(optimum, sft),
                                 "floor": kl(optimum, tdpo_optimum(sft, sample_pairs(pairs, "better"), BETA_R,
                                                                   ALPHA)),
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
          for q, r in m["mixtures"].items()], "",
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
        "to 1e-12 in the same world (same test file). Not covered yet: Ra-DPO with CVaR and ERM, the risk-aware "
        "stepwise gap, convergence against steps and pairs, the dual loop.", ""])


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m studies.theory", description=__doc__,
                                formatter_class=outputs.HelpFormatter)
    p.add_argument("--out", default="runs/theory", help="where the world and the stages go")
    p.add_argument("--report", default="docs/theory.md", help="the page written")
    args = p.parse_args(argv)

    def run(_):
        world = enumerable.build(os.path.join(args.out, "world"))
        m = measure(world, *train_stages(world, args.out), tdpo_folder=train_tdpo(world, args.out))
        m = wrong_settings(world, args.out, m)
        with open(args.report, "w", encoding="utf-8") as f:
            f.write(report(m))
        print(report(m))

    return outputs.run_script("python -m studies.theory", run)


if __name__ == "__main__":
    sys.exit(main())
