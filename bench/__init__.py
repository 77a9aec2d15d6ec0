"""Speed and memory of the training path (python -m bench) and the one-GPU check (python -m bench.smoke_gpu)."""
