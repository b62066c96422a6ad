import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download: Hub lookups fail fast
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pytest  # noqa: E402
import torch  # noqa: E402

from tests import tiny  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def pair():
    return tiny.build_pair()


@pytest.fixture(scope="session")
def target(pair):
    return pair[0]


@pytest.fixture(scope="session")
def draft(pair):
    return pair[1]


@pytest.fixture(scope="session")
def fuser(pair):
    return tiny.open_fuser(*pair)


@pytest.fixture(scope="session")
def saved_models(tmp_path_factory, pair, fuser):
    """The tiny pair, its tokenizer and fuser saved as a user would have them on disk."""
    from c2c.core.fuser import save_fuser

    root = tmp_path_factory.mktemp("models")
    tok = tiny.build_tokenizer()
    for name, model in zip(("target", "draft"), pair):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    save_fuser(fuser, root / "fuser")
    return root


@pytest.fixture(scope="session")
def saved_arch_pairs(tmp_path_factory):
    """Random pairs of a few architectures (tests/archs.py) saved with the tiny tokenizer, as a user has
    them on disk: name -> (target folder, draft folder)."""
    from tests import archs

    root = tmp_path_factory.mktemp("arch_pairs")
    return {name: archs.save_pair(archs.BY_NAME[name], root) for name in ("Gemma 2", "GPT-2", "BLOOM")}


@pytest.fixture(scope="module")
def windows(target):
    """Windows of the target's own greedy text: structured data the fuser can learn from (trainer tests)."""
    from c2c.tools import train_data
    from c2c.core.engine import standard_generate
    from c2c.core.sampling import SamplingConfig

    streams = []
    with torch.inference_mode():
        for start in range(12):
            streams.append(standard_generate(target, [start * 7 % 300, 5], 64, SamplingConfig(), set()).output_ids)
    return train_data.make_windows(streams, 32, None)
