"""The toy world: an offline safety-alignment problem whose true reward and cost are known (toy/world.py).

    python -m toy build --out worlds/toy
"""
