"""Faults and scale: exact resume after SIGKILL (mid-step, mid-checkpoint), non-finite steps, gradient
checkpointing, data parallel over 2 CPU processes, and the stacked-adapter reference of the QLoRA safety stage."""

import errno
import json
import os
import socket
import subprocess
import sys
import time

import faults
import pytest
import torch
from safetensors.torch import load_file
from test_stages import FAST, subset

import merge_policies
import outputs
import stage
import train_reward_stage
import train_safety_stage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def argv_for(world, pairs, out, steps=6, extra=()):
    return ["--sft", os.path.join(world, "sft"), "--data", pairs, "--eval_data", pairs, "--eval_pairs", "8",
            "--out", out, "--max_steps", str(steps), "--lr", "1e-2", "--save_every", "2", *FAST, *extra]


def adapter(folder):
    return load_file(os.path.join(folder, "adapter_model.safetensors"))


def same_weights(a, b, atol=0.0):
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=atol, rtol=0) for k in a)


@pytest.fixture(scope="module")
def reference_run(tiny_world, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reliability")
    pairs = subset(tiny_world, tmp)
    out = str(tmp / "uninterrupted")
    assert train_reward_stage.main(argv_for(tiny_world, pairs, out)) == 0
    return {"pairs": pairs, "out": out, "tmp": tmp}


@pytest.mark.parametrize("point", ["mid_step@5", "mid_checkpoint@4"])
def test_sigkill_then_resume_reaches_the_uninterrupted_weights(point, reference_run, tiny_world):
    out = str(reference_run["tmp"] / f"killed_{point.split('@')[0]}")
    run = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "faults.py"), point,
                          *argv_for(tiny_world, reference_run["pairs"], out)], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == -9, run.stderr[-2000:]  # killed by SIGKILL
    assert not os.path.exists(out)  # nothing half-written where the finished run goes
    ckpts = os.listdir(os.path.join(out + ".tmp", "checkpoints"))
    if point.startswith("mid_checkpoint"):
        assert "step-00000004.tmp" in ckpts and outputs.latest_checkpoint(out + ".tmp").endswith("step-00000002")
    else:
        assert outputs.latest_checkpoint(out + ".tmp").endswith("step-00000004")
    assert train_reward_stage.main(argv_for(tiny_world, reference_run["pairs"], out)) == 2  # no silent restart
    assert train_reward_stage.main(argv_for(tiny_world, reference_run["pairs"], out, extra=["--resume"])) == 0
    assert same_weights(adapter(out), adapter(reference_run["out"]))
    with open(os.path.join(out, outputs.METRICS_FILE)) as f:
        steps = [r["step"] for r in map(json.loads, f) if r["split"] == "train"]
    assert steps == sorted(set(steps))  # no duplicated records from the lost steps


def test_nonfinite_loss_stops_with_the_step_or_is_skipped(reference_run, tiny_world, monkeypatch, capsys):
    faults.plant("nan_loss", 3, monkeypatch.setattr)
    out = str(reference_run["tmp"] / "nan")
    assert train_reward_stage.main(argv_for(tiny_world, reference_run["pairs"], out)) == 2
    err = capsys.readouterr().err
    assert "non-finite loss at step 3" in err and "step-00000002" in err and "--resume" in err
    assert not os.path.exists(out) and outputs.latest_checkpoint(out + ".tmp").endswith("step-00000002")
    skip = str(reference_run["tmp"] / "nan_skipped")
    assert train_reward_stage.main(argv_for(tiny_world, reference_run["pairs"], skip,
                                            extra=["--skip_nonfinite"])) == 0
    with open(os.path.join(skip, outputs.COMPLETE_FILE)) as f:
        assert json.load(f)["nonfinite_skipped"] == 1
    assert all(torch.isfinite(v).all() for v in adapter(skip).values())


def test_gradient_checkpointing_gives_the_same_training(reference_run, tiny_world):
    out = str(reference_run["tmp"] / "gc")
    assert train_reward_stage.main(argv_for(tiny_world, reference_run["pairs"], out,
                                            extra=["--gradient_checkpointing"])) == 0
    assert same_weights(adapter(out), adapter(reference_run["out"]), atol=1e-5)


def test_deterministic_runs_and_changes_nothing_on_the_cpu(reference_run, tiny_world):
    """--deterministic (deterministic kernels only, for GPUs) trains, and on the CPU, deterministic already, gives
    the uninterrupted run's weights bitwise."""
    out = str(reference_run["tmp"] / "deterministic")
    try:
        assert train_reward_stage.main(argv_for(tiny_world, reference_run["pairs"], out,
                                                extra=["--deterministic"])) == 0
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)  # process-wide: the other tests run as users run
    assert same_weights(adapter(out), adapter(reference_run["out"]))


def test_checkpoints_are_removed_at_the_end_unless_kept(reference_run, tiny_world):
    assert not os.path.exists(os.path.join(reference_run["out"], "checkpoints"))
    out = str(reference_run["tmp"] / "kept")
    assert train_reward_stage.main(argv_for(tiny_world, reference_run["pairs"], out,
                                            extra=["--keep_checkpoints", "--save_total_limit", "5"])) == 0
    assert [os.path.basename(c) for c in outputs.complete_checkpoints(out)] == ["step-00000002", "step-00000004"]
    assert same_weights(adapter(out), adapter(reference_run["out"]))  # the same run, its checkpoints kept


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


LAUNCHERS = {"torchrun": ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port"],
             "accelerate": ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
                            "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port"]}


def launch(launcher, script, *argv):
    """Two processes of `script` started the way users start them (on a CPU: gloo)."""
    return subprocess.run([sys.executable, *LAUNCHERS[launcher], str(free_port()), script, *argv], capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))


@pytest.mark.parametrize("launcher,reduction", [("torchrun", "mean"), ("torchrun", "sum"), ("accelerate", "mean")])
def test_two_processes_equal_one_process_over_the_same_global_batch(launcher, reduction, reference_run, tiny_world):
    """gloo, 2 ranks x 4 pairs against 1 process x 8 pairs: the same loss and weights (a broken gradient sync
    would give each rank its own weights), for a mean over pairs (gradients averaged over ranks) and a sum
    (gradients added), under torchrun and accelerate launch."""
    common = ["--lora_dropout", "0", "--save_every", "0", "--loss_reduction", reduction]
    one = str(reference_run["tmp"] / f"ddp1_{reduction}")
    assert train_reward_stage.main(argv_for(tiny_world, reference_run["pairs"], one, steps=3,
                                            extra=[*common, "--batch_size", "8"])) == 0
    two = str(reference_run["tmp"] / f"ddp2_{launcher}_{reduction}")
    run = launch(launcher, os.path.join(ROOT, "train_reward_stage.py"),
                 *argv_for(tiny_world, reference_run["pairs"], two, steps=3, extra=[*common, "--batch_size", "4"]))
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "x 2 process(es)" in run.stdout
    # float summation order differs between 1 and 2 ranks, and Adam, which divides by the gradient's scale, turns
    # that into differences in near-zero-gradient weights after 3 steps: up to 5e-5 on one CPU, 3.4e-4 on another.
    # One process training on half the batch alone (what a rank without the sync does) ends 0.39 away at most
    assert same_weights(adapter(one), adapter(two), atol=1e-3)
    with open(os.path.join(one, outputs.METRICS_FILE)) as a, open(os.path.join(two, outputs.METRICS_FILE)) as b:
        la = [r["loss"] for r in map(json.loads, a) if r["split"] == "train"]
        lb = [r["loss"] for r in map(json.loads, b) if r["split"] == "train"]
    # the logged loss of 2 ranks is their mean; with a sum over pairs each rank sums half the pairs
    assert la == pytest.approx([x * (2 if reduction == "sum" else 1) for x in lb], abs=1e-5)


def test_stacked_reference_is_the_reward_policy(reference_run, tiny_world):
    """The QLoRA path's reference (stage 1 as a frozen adapter, the new one off), checked here in fp32."""
    from test_stages import sequence_logps

    import data

    out = str(reference_run["tmp"] / "stacked_safety")
    pairs = reference_run["pairs"]
    assert train_safety_stage.main(["--reward_stage", reference_run["out"], "--data", pairs, "--out", out,
                                    "--max_steps", "3", "--lr", "1e-2", *FAST]) == 0
    from test_merge_eval import assert_stock_is_the_trained_policy

    assert_stock_is_the_trained_policy(out)  # the 4-bit path's output loads with stock peft on the SFT model too
    args = stage.parse_args(train_safety_stage.build_parser(), ["--reward_stage", reference_run["out"], "--data", pairs,
                                                                "--out", out, *FAST])
    model = train_safety_stage.stacked_model(args, outputs.read_stage(reference_run["out"]), stage.Runtime("fp32"))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".default." in n for n in trainable)  # the reward adapter stays frozen
    tok = stage.load_tokenizer(reference_run["out"])
    batch = data.collate(data.tokenize_pairs(data.load_pairs(pairs, "safer")[:3], tok, 48, 24), tok.pad_token_id)
    model.eval()  # no LoRA dropout in the policy pass, so the two policy computations below agree
    with torch.no_grad():
        for p in model.parameters():  # move the new adapter away from zero, as training does
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
        logratio = stage.batch_terms(model, batch, stage.LossConfig.from_args(args),
                                     train_safety_stage.RewardStagePolicy())[0]
    pi_r = merge_policies.load_policy(reference_run["out"])
    policy_logps = sequence_logps(model, batch)  # both adapters active again after the reference pass
    assert torch.allclose(logratio, policy_logps - sequence_logps(pi_r, batch), atol=1e-4)
    assert logratio.abs().max() > 1e-3
    assert [n for n, p in model.named_parameters() if p.requires_grad] == trainable  # still frozen


def test_stacked_reference_keeps_stage_1_on_the_head_and_has_no_dropout(reference_run, tiny_world):
    """With LoRA on lm_head too, the stacked reference is still pi_r (stage 1's change to the head included, not
    the bare base head), and two reference passes in train mode agree (dropout off in the reference)."""
    from test_stages import sequence_logps

    import data

    pairs, tmp = reference_run["pairs"], reference_run["tmp"]
    lora = ["--lora_target_modules", "q_proj,v_proj,lm_head", "--lora_dropout", "0.5"]
    reward = str(tmp / "reward_with_head")
    assert train_reward_stage.main(argv_for(tiny_world, pairs, reward, steps=4, extra=lora)) == 0
    args = stage.parse_args(train_safety_stage.build_parser(), ["--reward_stage", reward, "--data", pairs, "--out",
                                                                str(tmp / "unused"), *FAST, *lora])
    model = train_safety_stage.stacked_model(args, outputs.read_stage(reward), stage.Runtime("fp32"))
    tok = stage.load_tokenizer(reward)
    batch = data.collate(data.tokenize_pairs(data.load_pairs(pairs, "safer")[:3], tok, 48, 24), tok.pad_token_id)
    for module in model.modules():  # attention dropout too: the reference pass must run without it
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = 0.5
    model.train()
    with torch.no_grad(), stage.reference_pass(model, train_safety_stage.RewardStagePolicy()):
        body, _ = stage.backbone_and_head(model)
        ref = [body(input_ids=batch["input_ids"]).last_hidden_state for _ in range(2)]
    assert torch.equal(ref[0], ref[1])  # the reference pass is deterministic in train mode
    assert model.training
    model.eval()  # the new adapter is still zero: the policy equals pi_r, so the log-ratio is 0 up to rounding
    with torch.no_grad():
        logratio = stage.batch_terms(model, batch, stage.LossConfig(measure=None),
                                     train_safety_stage.RewardStagePolicy())[0]
    assert torch.allclose(logratio, torch.zeros_like(logratio), atol=1e-4)
    pi_r = merge_policies.load_policy(reward)
    head_delta = train_safety_stage.RewardStagePolicy().head(stage.backbone_and_head(model)[1]).weight - \
        stage.backbone_and_head(model)[1].base_layer.weight
    assert head_delta.abs().max() > 1e-4  # stage 1 did change the head, and the reference keeps it
    assert torch.allclose(sequence_logps(model, batch), sequence_logps(pi_r, batch), atol=1e-4)


def test_stage_1_keeps_no_lora_dropout_in_the_policy_pass(reference_run, tiny_world):
    """pi_r is deterministic in the policy pass too: with the new adapter still zero, a train-mode policy pass (the
    new adapter's dropout on) gives exactly the reference pass, although stage 1 was trained with dropout 0.5. A
    frozen stage-1 adapter that kept its dropout would give a noisy pi_r here."""
    import data

    pairs, tmp = reference_run["pairs"], reference_run["tmp"]
    reward = str(tmp / "reward_dropout")
    assert train_reward_stage.main(argv_for(tiny_world, pairs, reward, steps=2, extra=["--lora_dropout", "0.5"])) == 0
    assert json.load(open(os.path.join(reward, "adapter_config.json")))["lora_dropout"] == 0.5
    args = stage.parse_args(train_safety_stage.build_parser(), ["--reward_stage", reward, "--data", pairs, "--out",
                                                                str(tmp / "unused"), "--lora_dropout", "0.5", *FAST])
    model = train_safety_stage.stacked_model(args, outputs.read_stage(reward), stage.Runtime("fp32"))
    tok = stage.load_tokenizer(reward)
    batch = data.collate(data.tokenize_pairs(data.load_pairs(pairs, "safer")[:4], tok, 48, 24), tok.pad_token_id)
    body, _ = stage.backbone_and_head(model)
    model.train()
    with torch.no_grad():
        policy = body(input_ids=batch["input_ids"]).last_hidden_state
        with stage.reference_pass(model, train_safety_stage.RewardStagePolicy()):
            ref = body(input_ids=batch["input_ids"]).last_hidden_state
    assert torch.equal(policy, ref)


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_a_killed_two_process_run_resumes_to_its_uninterrupted_weights(launcher, reference_run, tiny_world):
    """2 ranks on gloo: both killed in step 5, resumed from step 4's checkpoint (every rank's RNG state, LoRA
    dropout on), bitwise equal to the uninterrupted 2-process run."""
    pairs = reference_run["pairs"]
    common, stage_script = ["--batch_size", "4"], os.path.join(ROOT, "train_reward_stage.py")
    whole = str(reference_run["tmp"] / f"ddp_whole_{launcher}")
    run = launch(launcher, stage_script, *argv_for(tiny_world, pairs, whole, extra=common))
    assert run.returncode == 0, run.stderr[-2000:]
    killed = str(reference_run["tmp"] / f"ddp_killed_{launcher}")
    run = launch(launcher, os.path.join(ROOT, "tests", "faults.py"), "mid_step@5",
                 *argv_for(tiny_world, pairs, killed, extra=common))
    assert run.returncode != 0 and not os.path.exists(killed)
    assert outputs.latest_checkpoint(killed + ".tmp").endswith("step-00000004")
    run = launch(launcher, stage_script, *argv_for(tiny_world, pairs, killed, extra=[*common, "--resume"]))
    assert run.returncode == 0, run.stderr[-2000:]
    assert "resuming from" in run.stdout
    assert same_weights(adapter(killed), adapter(whole))


# ---------------------------------------------------------------- one writer per output, full disks, damaged files


def test_a_second_run_into_the_same_output_stops_while_the_first_lives(reference_run, tiny_world, capsys):
    """Two real processes: while the first trains, a second run into the same --out (plain, --overwrite or --resume)
    stops with a one-line error naming the first's pid; the first finishes intact. A lock left by a dead process is
    taken over with a note."""
    out = str(reference_run["tmp"] / "locked")
    argv = argv_for(tiny_world, reference_run["pairs"], out, steps=400, extra=["--save_every", "0"])
    first = subprocess.Popen([sys.executable, os.path.join(ROOT, "train_reward_stage.py"), *argv],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(600):  # wait until the first holds the lock
            if os.path.exists(out + ".lock"):
                break
            time.sleep(0.1)
        assert json.load(open(out + ".lock"))["pid"] == first.pid
        for extra in ([], ["--overwrite"], ["--resume"]):
            code = train_reward_stage.main(argv_for(tiny_world, reference_run["pairs"], out, steps=400, extra=extra))
            err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
            assert code == 2 and len(err) == 1 and f"another run (pid {first.pid}" in err[0], err
    finally:
        stdout, stderr = first.communicate(timeout=600)
    assert first.returncode == 0, stderr[-2000:]
    assert json.load(open(os.path.join(out, outputs.COMPLETE_FILE)))["steps"] == 400
    assert not os.path.exists(out + ".lock")
    # a stale lock: its process has exited
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = str(reference_run["tmp"] / "stale")
    with open(stale + ".lock", "w") as f:
        json.dump({"pid": int(dead.stdout), "host": socket.gethostname()}, f)
    assert train_reward_stage.main(argv_for(tiny_world, reference_run["pairs"], stale, steps=2)) == 0
    assert f"taking over the lock of pid {int(dead.stdout)}" in capsys.readouterr().out
    assert not os.path.exists(stale + ".lock")


def failing_write(monkeypatch, name, step_folder=None):
    """Make the write of one file fail with ENOSPC (in a checkpoint of `step_folder`, or in the final output)."""
    write = outputs.fsync_write

    def full_disk(path, fn):
        where = os.path.basename(os.path.dirname(path))
        final = where.endswith(".tmp") and not where.startswith("step-")  # the work folder of the final output
        if os.path.basename(path) == name and (where == step_folder if step_folder else final):
            raise OSError(errno.ENOSPC, "No space left on device", path)
        write(path, fn)

    monkeypatch.setattr(outputs, "fsync_write", full_disk)


@pytest.mark.parametrize("name,step_folder,last", [
    ("trainable.safetensors", "step-00000004.tmp", "step-00000002"),
    ("trainer_state.pt", "step-00000004.tmp", "step-00000002"),
    (outputs.COMPLETE_FILE, "step-00000004.tmp", "step-00000002"),
    (outputs.CONFIG_FILE, None, "step-00000004"),  # the final output's config
    (outputs.COMPLETE_FILE, None, "step-00000004"),  # the final output's marker
    ("adapter_model.safetensors", None, "step-00000004"),  # the final adapter
])
def test_a_failing_write_stops_with_the_path_and_keeps_the_last_checkpoint(name, step_folder, last, reference_run,
                                                                            tiny_world, monkeypatch, capsys):
    out = str(reference_run["tmp"] / f"enospc_{name.split('.')[0]}_{'checkpoint' if step_folder else 'final'}")
    failing_write(monkeypatch, name, step_folder)
    assert train_reward_stage.main(argv_for(tiny_world, reference_run["pairs"], out)) == 2
    err = "\n".join(line for line in capsys.readouterr().err.splitlines() if "error:" in line)
    assert len(err.splitlines()) == 1 and name in err and "No space left on device" in err, err
    assert f"the last complete checkpoint, {os.path.join(out + '.tmp', 'checkpoints', last)}, is intact" in err
    assert not os.path.exists(out) and not os.path.exists(out + ".lock")
    monkeypatch.undo()  # the disk has room again
    assert train_reward_stage.main(argv_for(tiny_world, reference_run["pairs"], out, extra=["--resume"])) == 0
    assert same_weights(adapter(out), adapter(reference_run["out"]))


def test_a_damaged_checkpoint_falls_back_to_the_previous_one(reference_run, tiny_world, monkeypatch, capsys):
    """Weights truncated, marker present: --resume notes it and continues from the checkpoint before, reaching the
    uninterrupted weights; with every checkpoint damaged, a one-line error naming the newest."""
    out = str(reference_run["tmp"] / "damaged")
    failing_write(monkeypatch, outputs.CONFIG_FILE)  # stop at the final save: checkpoints 2 and 4 are left
    assert train_reward_stage.main(argv_for(tiny_world, reference_run["pairs"], out)) == 2
    monkeypatch.undo()
    capsys.readouterr()
    ckpts = outputs.complete_checkpoints(out + ".tmp")
    assert [os.path.basename(c) for c in ckpts] == ["step-00000002", "step-00000004"]  # --save_total_limit 2
    weights = os.path.join(ckpts[-1], "trainable.safetensors")
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) // 2)
    assert train_reward_stage.main(argv_for(tiny_world, reference_run["pairs"], out, extra=["--resume"])) == 0
    printed = capsys.readouterr().out
    assert f"{ckpts[-1]}: unreadable" in printed and f"resuming from {ckpts[0]} (step 2)" in printed
    assert same_weights(adapter(out), adapter(reference_run["out"]))
    # every checkpoint damaged: nothing to fall back to
    again = str(reference_run["tmp"] / "damaged_all")
    failing_write(monkeypatch, outputs.CONFIG_FILE)
    assert train_reward_stage.main(argv_for(tiny_world, reference_run["pairs"], again)) == 2
    monkeypatch.undo()
    for ckpt in outputs.complete_checkpoints(again + ".tmp"):
        with open(os.path.join(ckpt, "trainer_state.pt"), "wb") as f:
            f.write(b"garbage")
    capsys.readouterr()
    assert train_reward_stage.main(argv_for(tiny_world, reference_run["pairs"], again, extra=["--resume"])) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "no readable checkpoint (the newest is" in errors[0] and "Traceback" not in err
