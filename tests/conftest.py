"""Fixtures shared by the test files."""
import json
import math
import os

import open_clip
import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest-xdist's workers share the cores: torch threads split between them
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    """write(spec) -> (model-config JSON path, weights path) of a random open_clip CLIP built from `spec` (seed 0,
    logit scale 100 as OpenAI's), the way a user's own CLIP is loaded: by config file and local weights."""
    def write(spec):
        folder = tmp_path_factory.mktemp("tiny_clip")
        (folder / "tiny_clip.json").write_text(json.dumps(spec))
        torch.manual_seed(0)
        clip = open_clip.model.CLIP(**spec)
        clip.logit_scale.data.fill_(math.log(100.0))
        torch.save(clip.state_dict(), folder / "tiny_clip.pt")
        return folder / "tiny_clip.json", folder / "tiny_clip.pt"
    return write
