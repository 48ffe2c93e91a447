"""Shared fixtures for the data tests: a generated corpus and a tiny tokenizer trained on it."""

import random

import pytest

from kis_megatron.data.tokenizer import train_tokenizer

_NAMES = ["Alice", "Bob", "Carmen", "Dmitri", "Eun-ji", "Farid", "Greta", "Hiroshi"]
_CITIES = ["Paris", "Lagos", "Osaka", "Quito", "Oslo", "Pune", "Lima", "Perth"]
_VERBS = ["was born in", "lives in", "works in", "studied in", "moved to"]


def make_sentences(n, seed=0):
    """n simple factual sentences, reproducible from the seed."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        out.append(
            f"{rng.choice(_NAMES)} {rng.choice(_VERBS)} {rng.choice(_CITIES)} "
            f"in {rng.randint(1900, 2024)}, with {rng.randint(0, 999)} friends."
        )
    return out


@pytest.fixture(scope="session")
def tok_sentences():
    return make_sentences(300)


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory, tok_sentences):
    """Path of a 400-piece BPE model trained on the generated sentences."""
    d = tmp_path_factory.mktemp("tok")
    corpus = d / "corpus.txt"
    corpus.write_text("\n".join(tok_sentences) + "\n", encoding="utf-8")
    return train_tokenizer([corpus], d / "tiny", vocab_size=400, num_threads=1)
