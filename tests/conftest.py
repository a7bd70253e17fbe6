"""Shared fixtures: small corpora and paths to the shared data folder."""
import os
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def shared_data_dir():
    """$NPGPT_DATA_DIR, else ../shared/data beside the checkout, else None."""
    for candidate in (os.environ.get("NPGPT_DATA_DIR"), ROOT.parent / "shared" / "data"):
        if candidate and (Path(candidate) / "tinyshakespeare.txt").exists():
            return Path(candidate)
    return None


@pytest.fixture
def corpus(tmp_path):
    """A ~30 kB text file with some structure for a tiny model to learn."""
    rng = np.random.default_rng(0)
    words = ["the", "king", "queen", "shall", "not", "be", "my", "lord", "thou", "art",
             "good", "night", "sweet", "prince", "and", "to", "love"]
    lines = []
    for _ in range(900):
        name = rng.choice(["ROMEO", "JULIET", "HAMLET"])
        lines.append(f"{name}:\n" + " ".join(rng.choice(words, size=6)) + ".\n")
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
