"""Fault injection for the tests, kept out of the training loop: it wraps stage.py's and outputs.py's
functions from outside.

    python tests/faults.py mid_step@5 ARGS...        # train_reward_stage.py, SIGKILL in step 5 after a forward pass
    python tests/faults.py mid_checkpoint@4 ARGS...  # SIGKILL while step 4's checkpoint is half written
    plant("nan_loss", 3, monkeypatch.setattr)        # in process: step 3's loss is NaN

Deterministic, unlike killing on a timer.
"""

import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import outputs  # noqa: E402
import stage  # noqa: E402


def kill():
    os.kill(os.getpid(), signal.SIGKILL)


def plant(point, at_step, setattr_=setattr):
    """Plant one fault at training step `at_step`: mid_step, mid_checkpoint or nan_loss."""
    if point == "mid_checkpoint":
        write = outputs.fsync_write

        def faulty_write(path, fn):
            if path.endswith(os.path.join(f"step-{at_step:08d}.tmp", "trainer_state.pt")):
                kill()  # the weights of this checkpoint are on disk, its state and marker are not
            write(path, fn)

        setattr_(outputs, "fsync_write", faulty_write)
        return
    if point not in ("mid_step", "nan_loss"):
        raise ValueError(f"unknown fault point {point}")
    update, loss_fn = stage.one_update, stage.batch_loss

    def faulty_loss(*args, **kwargs):
        loss, m = loss_fn(*args, **kwargs)
        if point == "mid_step":
            kill()
        return loss * float("nan"), {**m, "loss": m["loss"] * float("nan")}

    def faulty_update(*args, **kwargs):
        step = args[-1]
        stage.batch_loss = faulty_loss if step == at_step else loss_fn
        try:
            return update(*args, **kwargs)
        finally:
            stage.batch_loss = loss_fn

    setattr_(stage, "one_update", faulty_update)


if __name__ == "__main__":
    import train_reward_stage

    point, step = sys.argv[1].split("@")
    plant(point, int(step))
    sys.exit(train_reward_stage.main(sys.argv[2:]))
