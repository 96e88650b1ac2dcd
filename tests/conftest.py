import pytest
import torch
from hypothesis import Phase, settings

# `pytest --hypothesis-profile=no-shrink` reports fuzzing failures (tests/test_fuzz.py) without
# minimising them: shrinking a failing network can take minutes.
settings.register_profile("no-shrink", phases=[Phase.explicit, Phase.generate])


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    # The tests run small batches: intra-op threads gain little, and where another process shares
    # the two cores, threads waiting on each other made forwards 10-40x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
