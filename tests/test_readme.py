"""The README's Python examples run as written, on the backend the suite runs on.

Each ```python block runs in a fresh namespace. A block that leans on names the
README's text supplies around it (a corpus size, a batch, a model of one's own)
gets them from SETUP, keyed by the block's first line; any other block must run
as it stands, so a new example that does not is a failing test, not a stale page.
"""

import argparse
import os
import re

import pytest

from gpurnn.cli import build_parser

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SETUP = {
    # gpurnn.torch: the swap inside a user's own module's __init__
    "from gpurnn.torch import LSTM": "import types; self = types.SimpleNamespace()",
    # one half-precision training step of a CharLM: a corpus of 20 symbols, one batch
    "model = gpurnn.CharLM(vocab, 512, dtype=\"float16\")": (
        "import math, numpy as np, gpurnn\n"
        "vocab = 20\n"
        "rng = np.random.default_rng(0)\n"
        "x, y = rng.integers(0, vocab, (2, 8, 4))\n"),
    # the diagnostics on a small LSTM and its float64 twin
    "flow = gpurnn.diagnostics.gradient_flow(model, x)": (
        "import matplotlib; matplotlib.use('Agg')\n"
        "import numpy as np, gpurnn\n"
        "model = gpurnn.LSTM(4, 8, num_layers=2, seed=0)\n"
        "model64 = gpurnn.LSTM(4, 8, num_layers=2, seed=0, dtype='float64')\n"
        "x = np.random.default_rng(0).standard_normal((5, 2, 4)).astype(np.float32)\n"),
}


def readme():
    return open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()


def python_blocks():
    return re.findall(r"^```python\n(.*?)^```", readme(), re.S | re.M)


def test_the_readme_has_examples_and_setup_for_no_block_it_lacks():
    firsts = {block.splitlines()[0].split("#")[0].strip() for block in python_blocks()}
    assert len(firsts) >= 4
    assert set(SETUP) <= firsts, f"SETUP names blocks the README no longer has: {set(SETUP) - firsts}"


@pytest.mark.parametrize("block", python_blocks(), ids=lambda b: b.splitlines()[0][:40])
def test_a_readme_example_runs(block):
    if "gpurnn.torch" in block:
        pytest.importorskip("torch")  # optional, as the README says: its cross-checks skip without it
    namespace = {}
    exec(SETUP.get(block.splitlines()[0].split("#")[0].strip(), ""), namespace)
    exec(compile(block, "README.md", "exec"), namespace)


def test_the_readme_synopsis_lists_every_flag_of_train_and_sample():
    synopsis = readme().split("## Training\n\n```\n", 1)[1].split("```", 1)[0]
    lines = {}  # a command's lines: its own and the indented ones that continue it
    for line in synopsis.splitlines():
        if line.startswith("gpurnn "):
            command = line.split()[1]
        lines[command] = lines.get(command, "") + line
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert set(lines) == set(commands)
    for command in ("train", "sample"):
        flags = {o for action in commands[command]._actions for o in action.option_strings} - {"-h", "--help"}
        written = set(re.findall(r"--[a-z][a-z-]*", lines[command]))
        assert written == flags, (command, flags ^ written)
