"""The studies: RSA against its baselines on the toy world (matched.py) and on a small real model (real.py)."""
