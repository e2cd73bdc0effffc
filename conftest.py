import os

import pytest
import transformers

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may come from a model hub
transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()


@pytest.fixture(scope="session")
def toy(tmp_path_factory):
    """The toy setup, small: tiny checkpoints and a few samples, written once per test session."""
    import toy as setup
    out = str(tmp_path_factory.mktemp("toy"))
    setup.make_toy(out, seed=0, **setup.QUICK)
    return out
