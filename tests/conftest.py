import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session", autouse=True)
def gguf_cache(tmp_path_factory):
    """De-quantised GGUF models go to a folder of the test session, not the user's cache."""
    os.environ["RSA_CACHE"] = str(tmp_path_factory.mktemp("rsa-cache"))


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """A seconds-sized toy world, for tests that only need plumbing."""
    from toy import world as toy

    return toy.build(str(tmp_path_factory.mktemp("worlds") / "tiny"), size="tiny", seed=0)


@pytest.fixture(scope="session")
def full_world(tmp_path_factory):
    """The full-size toy world (under a minute), built once per test session and shared."""
    from toy import world as toy

    return toy.build(str(tmp_path_factory.mktemp("worlds") / "full"), size="full", seed=0)


@pytest.fixture(scope="session")
def enum_world(tmp_path_factory):
    """The enumerable world (toy/enumerable.py) with 1,500 pairs per prompt, built once per test session."""
    from toy import enumerable

    return enumerable.build(str(tmp_path_factory.mktemp("enum") / "world"), n_pairs=1500)
