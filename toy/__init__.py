"""The toy worlds.

    python -m toy build --out worlds/toy         # the toy world (toy/world.py): a language with a heavy harm tail
    python -m toy.enumerable --out worlds/enum   # a world small enough to list every response (toy/enumerable.py)
"""
