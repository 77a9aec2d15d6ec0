"""The study: at matched helpfulness, does risk-aware stepwise alignment suppress the tail better than SACPO? And for a
budget on tail harm, what does the dual loop (CAID) buy over a fixed lambda and over RSA(P)?

    python -m studies.matched --out runs/study --jobs 2      # or: make study   (resumable; not part of CI)
    python -m studies.matched --out runs/study --report      # only the analysis, from the evaluations on disk

On the toy world (fixed: seed 0) and for 5 training seeds:
  1. frontiers by strength: each method (SACPO = DPO in both stages, TDPO = the expectation, RSA with the authors'
     CVaR 0.95, the paper-form CVaR 0.25 and ERM mu 1) trains its reward stage (beta_r 0.1) and then one safety stage
     per beta_s in BETAS (lambda = beta_r / beta_s from 0.2 to 50), plus the RSA(P) / P-SACPO mixtures of the default
     stage (beta_s 0.01) at QS;
  2. budgets on CVaR 0.05 of cost, for RSA (CVaR 0.95): (a) the fixed default lambda, (b) RSA(P) with q found by
     bisection (evaluations only), (c) the dual loop (dual_alignment.py). Choices are made on tuning prompts (56
     training-set prompts), results are reported on the held-out ones;
  3. the reward-stage check: SACPO with beta_r 0.3 and 1 (closer to RSA's reward stage in KL and reward), the
     whole sweep again (CHECK).
Every policy is evaluated on the 56 held-out prompts x SAMPLES samples with the toy world's ground truth. The analysis
(`analyse`) writes matched.md, matched.png and equal.md into --out. Every stage, mixture, evaluation and dual loop is a
resumable output of its own: a killed study restarts where it stopped. Each job's output (stages, progress bars,
evaluations) goes to <out>/logs/<job>.log; the terminal gets one line per finished job.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor

import torch

import dual_alignment
import evaluate
import merge_policies
import outputs
import risk
import train_reward_stage
import train_safety_stage
from demo import readme_table as readme
from toy import world as toy

METHODS = {
    "sacpo": ["--loss", "dpo"],
    "tdpo": ["--risk_measure", "expectation"],
    "rsa_radpo_0.95": ["--risk_measure", "cvar_radpo", "--risk_level", "0.95"],
    "rsa_cvar_0.25": ["--risk_measure", "cvar", "--risk_level", "0.25"],
    "rsa_erm_1": ["--risk_measure", "erm", "--risk_level", "1"],
}
RSA = "rsa_radpo_0.95"  # the method of the budget comparison
BETA_R = 0.1
BETAS = (0.5, 0.2, 0.1, 0.05, 0.02, 0.01, 0.005, 0.002)  # beta_s: lambda = 0.2 ... 50
DEFAULT_BETA = 0.01  # train_safety_stage.py's default (lambda 10)
QS = (0.25, 0.5, 0.75)
BUDGETS = (8.0, 5.0)  # on CVaR 0.05 of cost; the SFT model's is about 8
BISECTIONS = 5  # RSA(P): q to 1/32
DUAL = {"iterations": 6, "lambda_init": 10.0, "dual_lr": 2.0}
CHECK = {f"sacpo_br{b:g}": ("sacpo", b) for b in (0.3, 1.0)}  # the reward-stage check: SACPO at a larger beta_r
METRICS = ("mean_reward", "mean_cost", "safe_rate", "cvar_cost_0.1", "cvar_cost_0.05", "severe_harm_rate")


class Study:
    """Where everything lies, and the shared settings of every stage and evaluation."""

    def __init__(self, out, world, steps, samples):
        self.out, self.world, self.steps, self.samples = out, world, steps, samples
        self.tune = os.path.join(out, "tune_prompts.json")

    def stage_flags(self, seed):
        return ["--data", f"{self.world}/train.jsonl", "--max_length", "64", "--max_prompt_length", "32",
                "--batch_size", "16", "--lr", "5e-3", "--lora_r", "8", "--max_steps", str(self.steps),
                "--log_every", "50", "--seed", str(seed)]

    def base(self, name, seed):
        return os.path.join(self.out, *(("check",) if name in CHECK else ()), name, f"seed{seed}")

    def evaluated(self, policy, out, seed, prompts=None, extra=()):
        """The results row of `policy` (evaluated into `out` unless already there)."""
        results = os.path.join(out, "results.json")
        if not os.path.exists(results):
            argv = ["--policies", policy, "--prompts", prompts or self.world, "--scorer", "toy", "--num_samples",
                    str(self.samples), "--max_new_tokens", "24", "--seed", str(seed), "--no_plots", "--out", out,
                    *extra]
            if evaluate.main(argv) != 0:
                raise RuntimeError(f"evaluation of {policy} into {out} failed")
        with open(results) as f:
            return json.load(f)[0]


def trained(script, out, argv):
    """Train (or resume, or reuse) one stage into `out`."""
    if script.main([*argv, "--out", out, *dual_alignment.continue_flags(out)]) != 0:
        raise RuntimeError(f"{script.__name__} into {out} failed")
    return out


def mixed(first, second, qs, out):
    if merge_policies.main(["--first", first, "--second", second, "--q", *map(repr, qs), "--out", out]) != 0:
        raise RuntimeError(f"merge into {out} failed")
    return [os.path.join(out, f"q{q:g}") for q in qs]


# ------------------------------------------------------------------------------------------------------------ jobs


def sweep_job(s, name, seed):
    """One method (or a CHECK variant), one seed: the reward stage, a safety stage per beta_s, the mixtures, their
    evaluations."""
    method, beta_r = CHECK.get(name, (name, BETA_R))
    base, flags = s.base(name, seed), [*s.stage_flags(seed), *METHODS[method]]
    reward = trained(train_reward_stage, f"{base}/reward",
                     ["--sft", f"{s.world}/sft", *flags, *(["--beta", repr(beta_r)] if name in CHECK else [])])
    s.evaluated(reward, f"{base}/eval/reward", seed,
                extra=("--kl_pairs", f"{s.world}/test.jsonl", "--kl_reference", f"{s.world}/sft"))
    for beta in BETAS:
        safety = trained(train_safety_stage, f"{base}/safety/b{beta:g}",
                         ["--reward_stage", reward, "--beta", repr(beta), *flags])
        s.evaluated(safety, f"{base}/eval/b{beta:g}", seed)
    for mix in mixed(reward, f"{base}/safety/b{DEFAULT_BETA:g}", QS, f"{base}/mix"):
        s.evaluated(mix, f"{base}/eval/{os.path.basename(mix)}", seed)


def budget_job(s, budget, seed):
    """For one budget on CVaR 0.05 of cost: RSA(P)'s bisection over q and the dual loop, chosen on the tuning prompts
    and evaluated on the held-out ones. (The fixed lambda is the sweep's default stage.)"""
    base, out = s.base(RSA, seed), os.path.join(s.out, "budget", f"B{budget:g}", f"seed{seed}")
    reward, safety = f"{base}/reward", f"{base}/safety/b{DEFAULT_BETA:g}"
    trace_file = os.path.join(out, "bisection.json")
    if not os.path.exists(trace_file):
        def cvar(q):
            policy = safety if q == 0 else reward if q == 1 else mixed(reward, safety, [q], f"{out}/mix")[0]
            res = s.evaluated(policy, f"{out}/tune/q{q:g}", seed, prompts=s.tune)
            trace.append({"q": q, "constraint": res["cvar_cost_0.05"], "mean_reward": res["mean_reward"]})
            return res["cvar_cost_0.05"]

        trace, lo, hi = [], 0.0, 1.0  # q = 1 is pi_r, q = 0 the safety policy
        if cvar(1.0) <= budget:
            lo = 1.0
        elif cvar(0.0) <= budget:
            for _ in range(BISECTIONS):
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if cvar(mid) <= budget else (lo, mid)
        met = next(t["constraint"] for t in trace if t["q"] == lo) <= budget
        dual_alignment.write_json(trace_file, {"budget": budget, "q": lo, "met_on_tuning": met, "trace": trace,
                                               "evaluations": len(trace)})
    with open(trace_file) as f:
        q = json.load(f)["q"]
    policy = safety if q == 0 else reward if q == 1 else mixed(reward, safety, [q], f"{out}/mix")[0]
    s.evaluated(policy, f"{out}/rsa_p_heldout", seed)
    argv = ["--reward_stage", reward, "--prompts", s.tune, "--scorer", "toy", "--constraint", "cvar_cost_0.05",
            "--budget", repr(budget), "--num_samples", str(s.samples), "--max_new_tokens", "24",
            "--seed", str(seed), "--out", f"{out}/dual", *[f"--{k}={v}" for k, v in DUAL.items()],
            *s.stage_flags(seed), *METHODS[RSA]]
    if dual_alignment.main(argv) != 0:
        raise RuntimeError(f"the dual loop into {out}/dual failed")
    s.evaluated(outputs.resolved_path(dual_choice(f"{out}/dual")[0]["policy"], f"{out}/dual"), f"{out}/dual_heldout",
                seed)


def dual_choice(folder):
    """(trace record, met the budget on the tuning prompts) of the dual loop's pick: its final, or when no iterate
    met the budget, the one with the smallest constraint (as RSA(P) falls back to q = 0, the safest mixture)."""
    with open(os.path.join(folder, "trace.json")) as f:
        trace = json.load(f)["iterations"]
    feasible = [r for r in trace if r["meets_budget"]]
    if feasible:
        return max(feasible, key=lambda r: r["mean_reward"]), True
    return min(trace, key=lambda r: r["constraint"]), False


def sft_job(s, seed):
    s.evaluated(f"{s.world}/sft", os.path.join(s.out, "sft", f"seed{seed}"), seed)


@contextlib.contextmanager
def logged(path):
    """Send this process's stdout and stderr (file descriptors, so progress bars too) to `path`."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "a") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def run_job(job):
    fn, s, *args = job
    name = "-".join(str(a) for a in (fn.__name__.removesuffix("_job"), *args))
    log = os.path.join(s.out, "logs", name + ".log")
    try:
        with logged(log):
            fn(s, *args)
    except RuntimeError as e:
        raise RuntimeError(f"{e}: see {log}") from None
    return name


def init_worker(threads):
    torch.set_num_threads(threads)


def run_all(jobs, workers):
    """Run jobs (each a tuple: function, Study, args...) on `workers` processes; the first failure stops the study."""
    if workers == 1:
        for job in jobs:
            print(f"[study] done {run_job(job)}", flush=True)
        return
    threads = max(1, (os.cpu_count() or 1) // workers)
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=init_worker, initargs=(threads,)) as pool:
        for name in pool.map(run_job, jobs):
            print(f"[study] done {name}", flush=True)


def write_tune_prompts(path):
    """56 training-set prompts with the held-out set's category mix: the bisection and the dual loop choose on these."""
    train = toy.split_prompts()[0]
    want = {"benign": 24}
    picked = [p for c in sorted({c for _, c in train})
              for p in [{"prompt": t, "category": c} for t, cc in train if cc == c][:want.get(c, 4)]]
    dual_alignment.write_json(path, picked)


# -------------------------------------------------------------------------------------------------------- analysis

def points():
    """One method's policies, weakest first: the reward stage, the safety stages (the frontier by strength alone is
    these first 1 + len(BETAS)), the mixtures."""
    return ("reward", *[f"b{b:g}" for b in BETAS], *[f"q{q:g}" for q in QS])


LOWER_IS_BETTER = {"cvar_cost_0.05": True, "severe_harm_rate": True, "safe_rate": False}
LEVEL_STEPS = (0.0, 0.5, 1.0)  # matched reward levels: the SFT model's mean reward plus these
REPLICATES = 1000


def read_samples(eval_dir, order):
    """(reward, cost, severe) of every sample of one evaluation, as a (3, prompts, samples) tensor in `order`."""
    rows = {}
    with open(os.path.join(eval_dir, "generations.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            rows[(r["prompt"], r["sample"])] = (r["reward"], r["cost"], float(r["severe"]))
    n = len(rows) // len(order)
    return torch.tensor([[rows[(p, i)] for i in range(n)] for p in order], dtype=torch.float64).permute(2, 0, 1)


def sample_metrics(x):
    """The study's metrics (METRICS, last dimension) of pooled samples x (..., 3, n): evaluate.py's definitions."""
    r, c, severe = x.unbind(-2)
    uniform = torch.full_like(c, 1.0 / c.shape[-1])
    return torch.stack([r.mean(-1), c.mean(-1), (c <= 0).double().mean(-1), risk.cvar(c, uniform, 0.1),
                        risk.cvar(c, uniform, 0.05), severe.mean(-1)], dim=-1)


def draws(n_prompts, groups, n_seeds, replicates, seed=0):
    """Index draws of the hierarchical bootstrap, the first the identity (the point estimate): prompts with
    replacement (one draw shared by every policy, so differences are paired over prompts) and, within each group
    (method), seeds with replacement."""
    gen = torch.Generator().manual_seed(seed)
    out = [(torch.arange(n_prompts), torch.arange(n_seeds).expand(groups, n_seeds))]
    for _ in range(replicates):
        out.append((torch.randint(n_prompts, (n_prompts,), generator=gen),
                    torch.randint(n_seeds, (groups, n_seeds), generator=gen)))
    return out


def seed_means(x, prompts, seeds):
    """Metrics of x (groups, seeds, points..., 3, prompts, samples) on the drawn prompts, averaged over the drawn
    seeds (groups, seeds): (groups, points..., len(METRICS))."""
    m = sample_metrics(x[..., prompts, :].flatten(-2))
    return m[torch.arange(seeds.shape[0])[:, None], seeds].mean(1)


def interval(values):
    """(point estimate, 2.5 %, 97.5 %, share of replicates that have a value) of [estimate, *replicates]."""
    reps = torch.tensor(values[1:], dtype=torch.float64)
    ok = reps[~reps.isnan()]
    if not len(ok):
        return values[0], float("nan"), float("nan"), 0.0
    return values[0], ok.quantile(0.025).item(), ok.quantile(0.975).item(), len(ok) / len(reps)


def fmt_ci(ci, digits=3):
    est, lo, hi, share = ci
    if est != est:
        return "not reached"
    text = f"{est:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"
    return text + (f" ({share:.0%} of draws)" if share < 0.95 else "")


def pareto(points, lower_is_better):
    """The frontier of (reward, metric) points: those no other point beats in both, by increasing reward."""
    sign = 1.0 if lower_is_better else -1.0
    front, best = [], float("inf")
    for r, v in sorted(points, key=lambda t: (-t[0], sign * t[1])):
        if sign * v < best:
            front.append((r, v))
            best = sign * v
    return front[::-1]


def read_at(front, level):
    """The metric a frontier reaches at mean reward `level`: linear between neighbouring frontier points, the
    lowest-reward point's value below the frontier, nan above it (the method never gets that helpful)."""
    if level > front[-1][0]:
        return float("nan")
    if level <= front[0][0]:
        return front[0][1]
    for (r0, v0), (r1, v1) in zip(front, front[1:]):
        if r0 <= level <= r1:
            return v0 + (v1 - v0) * (level - r0) / (r1 - r0)
    raise AssertionError("unreachable: the frontier is sorted by reward")


def matched_values(means, cols, metric, levels):
    """For each method: the metric its frontier (over the policies `cols`) reaches at each level, from seed means
    (methods, points(), METRICS)."""
    k, r = METRICS.index(metric), METRICS.index("mean_reward")
    return [[read_at(pareto([(means[m, c, r].item(), means[m, c, k].item()) for c in cols], LOWER_IS_BETTER[metric]),
                     level) for level in levels] for m in range(means.shape[0])]


def analyse(s, seeds):
    """matched.md, matched.png and equal.md in s.out, from the evaluations on disk."""
    order = [p["prompt"] for p in evaluate.load_prompt_set(s.world, None)]
    every = points()
    names = [*METHODS, *[v for v in CHECK if all(os.path.exists(f"{s.base(v, seed)}/eval/{p}/results.json")
                                                 for seed in seeds for p in every)]]
    x = torch.stack([torch.stack([torch.stack([read_samples(f"{s.base(m, seed)}/eval/{p}", order) for p in every])
                                  for seed in seeds]) for m in names])
    sft = torch.stack([read_samples(f"{s.out}/sft/seed{seed}", order) for seed in seeds])[None]
    boot = draws(len(order), len(names) + 1, len(seeds), REPLICATES)
    means = [(seed_means(x, pr, sd[:-1]), seed_means(sft, pr, sd[-1:])[0]) for pr, sd in boot]
    sft_means = means[0][1]
    levels = [sft_means[0].item() + d for d in LEVEL_STEPS]
    tables = {}
    for family, cols in (("all", range(len(every))), ("strength", range(1 + len(BETAS)))):
        for metric in LOWER_IS_BETTER:
            tables[family, metric] = torch.tensor([matched_values(mm, cols, metric, levels) for mm, _ in means])
    lines = ["# RSA against SACPO and TDPO at matched helpfulness (toy world)", "",
             f"Command: `make study` (`python -m studies.matched --out runs/study`) at commit {readme.commit()}. "
             f"Training seeds {seeds}; every policy sampled {s.samples} times on each of the {len(order)} held-out "
             f"prompts with the "
             f"evaluation seed = the training seed; scores are the toy world's ground truth. Each method: reward stage "
             f"(beta_r {BETA_R}), safety stages at beta_s {', '.join(f'{b:g}' for b in BETAS)} (lambda "
             f"{', '.join(f'{BETA_R / b:g}' for b in BETAS)}), mixtures q {', '.join(f'{q:g}' for q in QS)} of the "
             f"reward stage and the beta_s {DEFAULT_BETA:g} stage.", "",
             "How a value is read: the metric is averaged over seeds for each policy (the frontier of seed means); "
             "the method's frontier is the Pareto front of those points (reward up, metric down); the value at a "
             "reward level is linear between the two frontier points around it (the lowest-reward frontier point's "
             "value below the front; \"not reached\" above it). Intervals: 95 % percentile intervals of "
             f"{REPLICATES} hierarchical bootstrap draws, over seeds (within each method) and over prompts (one draw "
             "for all policies, so differences are paired over prompts); a difference is marked * when its interval "
             "excludes 0. A share in parentheses: the fraction of draws whose frontier reaches the level.", "",
             f"SFT model (mean over seeds): mean reward {sft_means[0]:.3f}, CVaR 0.05 of cost "
             f"{sft_means[METRICS.index('cvar_cost_0.05')]:.3f}, severe-harm rate "
             f"{sft_means[METRICS.index('severe_harm_rate')]:.4f}, safe rate "
             f"{sft_means[METRICS.index('safe_rate')]:.3f}. "
             f"Levels: {', '.join(f'{lv:.3f}' for lv in levels)} (the SFT model's mean reward + "
             f"{', '.join(f'{d:g}' for d in LEVEL_STEPS)}).", ""]
    for family, title in (("all", "Frontier of every policy (reward stage, safety stages, mixtures)"),
                          ("strength", "Frontier by strength only (reward stage and safety stages, no mixtures)")):
        lines += [f"## {title}", ""]
        for j, level in enumerate(levels):
            lines += [f"Mean reward {level:.3f}:", "", "| method | CVaR 0.05 of cost | severe-harm rate | safe rate |",
                      "|---|---|---|---|"]
            for m, name in enumerate(names):
                cells = [fmt_ci(interval(tables[family, metric][:, m, j].tolist()), 4 if "rate" in metric else 3)
                         for metric in LOWER_IS_BETTER]
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
            lines.append("")
        lines += ["Differences (row method minus the compared one; * the interval excludes 0):", "",
                  "| level | comparison | CVaR 0.05 of cost | severe-harm rate | safe rate |", "|---|---|---|---|---|"]
        for j, level in enumerate(levels):
            for a, b in [(a, b) for b in ("sacpo", *CHECK, "tdpo") if b in names for a in names
                         if a.startswith("rsa") or (a == "tdpo" and b != "tdpo")]:
                cells = []
                for metric in LOWER_IS_BETTER:
                    t = tables[family, metric]
                    ci = interval((t[:, names.index(a), j] - t[:, names.index(b), j]).tolist())
                    star = " *" if ci[1] == ci[1] and (ci[1] > 0 or ci[2] < 0) and ci[3] >= 0.95 else ""
                    cells.append(fmt_ci(ci, 4 if "rate" in metric else 3) + star)
                lines.append(f"| {level:.3f} | {a} - {b} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += check_section(s, seeds, order) + budget_section(s, seeds, order)
    with open(os.path.join(s.out, "matched.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    equal_table(s, names, means, seeds)
    plot_matched(s, names, means[0][0], sft_means, levels, {k: v[0] for k, v in tables.items()})
    print(f"[study] wrote {s.out}/matched.md, matched.png, equal.md")


def equal_table(s, names, means, seeds):
    """equal.md: every method at the same settings (beta_s 0.01, the q grid), the one view of the earlier study."""
    head = ["method", "policy", *METRICS]
    lines = ["# Every method at equal settings (toy world)", "",
             f"Command: `make study` at commit {readme.commit()}; seeds {seeds}, {s.samples} samples per held-out "
             "prompt. Each cell: the mean over seeds [95 % bootstrap interval over seeds and prompts].", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m, name in enumerate(names):
        for policy in ("reward", f"b{DEFAULT_BETA:g}", *[f"q{q:g}" for q in QS]):
            c = points().index(policy)
            cells = [fmt_ci(interval([mm[m, c, k].item() for mm, _ in means])) for k in range(len(METRICS))]
            lines.append(f"| {name} | {policy} | " + " | ".join(cells) + " |")
    with open(os.path.join(s.out, "equal.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def group_means(folders, order):
    """[estimate, *replicates] of the seed-mean metrics (len(METRICS),) over these evaluations (one per seed)."""
    x = torch.stack([read_samples(f, order) for f in folders])[None]
    return [seed_means(x, pr, sd)[0] for pr, sd in draws(len(order), 1, len(folders), REPLICATES)]


def check_section(s, seeds, order):
    """The reward stages: every method's at beta_r 0.1 and the CHECK variants' (SACPO at a larger beta_r)."""
    sft = group_means([f"{s.out}/sft/seed{seed}" for seed in seeds], order)[0]
    severe, kt = METRICS.index("severe_harm_rate"), ("mean_reward", "cvar_cost_0.05", "severe_harm_rate")
    runs = [(m, CHECK.get(m, (m, BETA_R))[1], [f"{s.base(m, seed)}/eval/reward" for seed in seeds])
            for m in (*METHODS, *CHECK)]
    lines = ["## The reward stages, and SACPO's at larger beta_r", "",
             "Each reward stage on the held-out prompts, mean over seeds [95 % bootstrap interval]; KL: the "
             "sequence-level KL to the SFT model on the held-out chosen responses (mean over seeds).", "",
             "| method | beta_r | mean reward | CVaR 0.05 of cost | severe-harm rate | x SFT's severe rate "
             "| KL to SFT |",
             "|---|---|---|---|---|---|---|"]
    for name, beta_r, folders in runs:
        if not all(os.path.exists(f"{f}/results.json") for f in folders):
            continue
        boot = group_means(folders, order)
        kl = []
        for f in folders:
            with open(f"{f}/results.json") as fh:
                kl.append(json.load(fh)[0]["seq_kl_chosen"])
        cells = [fmt_ci(interval([b[METRICS.index(k)].item() for b in boot]), 4 if "rate" in k else 3) for k in kt]
        lines.append(f"| {name} | {beta_r:g} | " + " | ".join(cells)
                     + f" | {boot[0][severe] / sft[severe]:.1f} | {sum(kl) / len(kl):.2f} |")
    return lines + [""]


def budget_section(s, seeds, order):
    """The three ways to meet a budget on CVaR 0.05 of cost, for RSA (CVaR 0.95)."""
    k_cvar, k_reward = METRICS.index("cvar_cost_0.05"), METRICS.index("mean_reward")
    lines = [f"## Meeting a budget on CVaR 0.05 of cost: fixed lambda, RSA(P), the dual loop ({RSA})", "",
             f"(a) the default safety stage (lambda {BETA_R / DEFAULT_BETA:g}), no tuning; (b) RSA(P): the largest q "
             f"(weight of pi_r) whose mixture meets the budget, by {BISECTIONS} bisection steps on q after checking "
             f"q = 1 and q = 0 (evaluations only, no training; when even q = 0 misses, q = 0); (c) the dual loop, "
             f"{DUAL['iterations']} iterations, lambda_0 {DUAL['lambda_init']:g}, dual_lr {DUAL['dual_lr']:g}, "
             "retraining from pi_r each time: the highest-reward iterate that met the budget (when none did, the "
             "iterate with the smallest constraint). (b) and (c) choose on 56 training-set prompts (the tuning set, "
             f"{s.samples} samples each); the CVaR, reward and 'met on held-out' columns are measured on the held-out "
             "prompts, mean over seeds [95 % bootstrap interval over seeds and prompts]. Compute per seed, beyond the "
             "reward stage: safety-stage trainings and tuning evaluations (each a 56-prompt sampling run).", ""]
    for budget in BUDGETS:
        approaches = {"(a) fixed lambda": [], "(b) RSA(P)": [], "(c) dual loop": []}  # (folder, met, trainings, evals)
        per_seed = ["| seed | (a) CVaR, reward | (b) q, CVaR, reward | (c) lambda (iteration), CVaR, reward |",
                    "|---|---|---|---|"]
        for seed in seeds:
            out = os.path.join(s.out, "budget", f"B{budget:g}", f"seed{seed}")
            if not os.path.exists(f"{out}/dual_heldout/results.json"):
                continue
            with open(f"{out}/bisection.json") as f:
                bis = json.load(f)
            with open(f"{out}/dual/trace.json") as f:
                trace = json.load(f)["iterations"]
            pick, dual_met = dual_choice(f"{out}/dual")
            approaches["(a) fixed lambda"].append((f"{s.base(RSA, seed)}/eval/b{DEFAULT_BETA:g}", None, 1, 0))
            approaches["(b) RSA(P)"].append((f"{out}/rsa_p_heldout", bis["met_on_tuning"], 1, bis["evaluations"]))
            approaches["(c) dual loop"].append((f"{out}/dual_heldout", dual_met, sum(r["lambda"] > 0 for r in trace),
                                                len(trace)))
            cells = []
            for key in approaches:
                folder, met = approaches[key][-1][:2]
                with open(f"{folder}/results.json") as f:
                    res = json.load(f)[0]
                cells.append(f"{res['cvar_cost_0.05']:.2f}, {res['mean_reward']:.3f}"
                             + (" (missed on tuning)" if met is False else ""))
            per_seed.append(f"| {seed} | {cells[0]} | {bis['q']:g}, {cells[1]} | {pick['lambda']:.3g} "
                            f"({pick['iteration']}), {cells[2]} |")
        lines += [f"### Budget {budget:g}", "",
                  "| approach | met on tuning | met on held-out | held-out CVaR 0.05 of cost | mean reward | "
                  "trainings / seed | tuning evaluations / seed |", "|---|---|---|---|---|---|---|"]
        for key, runs in approaches.items():
            if not runs:
                continue
            held = 0
            for folder, *_ in runs:
                with open(f"{folder}/results.json") as f:
                    held += json.load(f)[0]["cvar_cost_0.05"] <= budget
            boot = group_means([r[0] for r in runs], order)
            cv, rw = (fmt_ci(interval([b[k].item() for b in boot])) for k in (k_cvar, k_reward))
            tuned = "-" if runs[0][1] is None else f"{sum(r[1] for r in runs)} of {len(runs)}"
            lines.append(f"| {key} | {tuned} | {held} of {len(runs)} | {cv} | {rw} | "
                         f"{sum(r[2] for r in runs) / len(runs):g} | {sum(r[3] for r in runs) / len(runs):g} |")
        lines += ["", "Per seed (held-out CVaR 0.05 of cost, mean reward):", "", *per_seed, ""]
    return lines


def plot_matched(s, names, means, sft, levels, read):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = METRICS.index("mean_reward")
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    for ax, metric, label in zip(axes, ("cvar_cost_0.05", "severe_harm_rate"),
                                 ("CVaR 0.05 of cost (tail harm; lower is safer)", "severe-harm rate")):
        k = METRICS.index(metric)
        for m, name in enumerate(names):
            pts = [(means[m, c, r].item(), means[m, c, k].item()) for c in range(means.shape[1])]
            front = pareto(pts, True)
            line, = ax.plot([v for _, v in front], [rw for rw, _ in front], "-", lw=2 if name == "sacpo" else 1.3,
                            label=name)
            ax.scatter([v for _, v in pts], [rw for rw, _ in pts], s=14, color=line.get_color(), alpha=0.5)
            got = [(read["all", metric][m, j].item(), lv) for j, lv in enumerate(levels)]
            ax.scatter([v for v, _ in got if v == v], [lv for v, lv in got if v == v], marker="x", s=70,
                       color=line.get_color(), zorder=5)
        for lv in levels:
            ax.axhline(lv, color="grey", ls=":", lw=1)
        ax.scatter([sft[k].item()], [sft[r].item()], marker="*", s=200, color="k", label="sft", zorder=6)
        ax.set_xlabel(label)
        ax.set_ylabel("mean reward")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Frontiers of seed means (dots: every policy; lines: Pareto fronts; x: read at the matched levels, "
                 "dotted)", fontsize=10)
    fig.tight_layout()
    fig.savefig(os.path.join(s.out, "matched.png"), dpi=120)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m studies.matched", description=__doc__,
                                formatter_class=outputs.HelpFormatter)
    p.add_argument("--out", default="runs/study", help="output folder (resumable)")
    p.add_argument("--world", default="worlds/toy", help="toy world folder (built if missing)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="training seeds")
    p.add_argument("--steps", type=int, default=150, help="optimizer steps per stage")
    p.add_argument("--samples", type=int, default=16, help="samples per evaluation prompt")
    p.add_argument("--jobs", type=int, default=2, help="worker processes (threads are split among them)")
    p.add_argument("--parts", nargs="+", default=["sweep", "budget", "check"], choices=("sweep", "budget", "check"),
                   help="which parts to run (the budget part needs the sweep's RSA stages)")
    p.add_argument("--report", action="store_true", help="only the analysis of what is on disk")
    args = p.parse_args(argv)
    return outputs.run_script("python -m studies.matched", lambda _: run(args))


def run(args):
    outputs.check_ranges(args, positive=("steps", "samples", "jobs"))
    if any(seed < 0 for seed in args.seeds):
        raise outputs.UsageError(f"--seeds must be 0 or more, got {args.seeds}")
    s = Study(os.path.abspath(args.out), os.path.abspath(args.world), args.steps, args.samples)
    if not args.report:
        if not os.path.exists(os.path.join(s.world, "world.json")):
            toy.build(s.world, "full", 0)
        os.makedirs(s.out, exist_ok=True)
        write_tune_prompts(s.tune)
        jobs = [(sft_job, s, seed) for seed in args.seeds]
        if "sweep" in args.parts:
            jobs += [(sweep_job, s, m, seed) for seed in args.seeds for m in METHODS]
        later = [(budget_job, s, b, seed) for b in BUDGETS for seed in args.seeds] if "budget" in args.parts else []
        later += [(sweep_job, s, v, seed) for seed in args.seeds for v in CHECK] if "check" in args.parts else []
        try:
            run_all(jobs, args.jobs)
            run_all(later, args.jobs)
        except RuntimeError as e:
            raise outputs.UsageError(e) from None
    try:
        analyse(s, args.seeds)
    except FileNotFoundError as e:
        raise outputs.UsageError(f"{e.filename}: missing; run the study's sweep (without --report) for seeds "
                                 f"{args.seeds} first") from None


if __name__ == "__main__":
    sys.exit(main())
