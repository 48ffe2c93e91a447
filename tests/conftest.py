"""Session fixtures shared by every test folder (helpers live in tests/_corpus.py)."""

import pytest

from _corpus import build_world_corpus


@pytest.fixture(scope="session")
def world_corpus(tmp_path_factory) -> dict:
    return build_world_corpus(tmp_path_factory.mktemp("corpus"))
