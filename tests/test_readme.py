"""Every ```python and ```bash block of README.md runs as written: a newcomer copies them first.

Python blocks run in a fresh namespace each (a block that forgets an import fails), at the README's own sizes.
One substitution, made here and never in the text: the torch.compile block runs with the backend that stops one
step short of inductor's code generation (``aot_eager_decomp_partition``: the same Dynamo trace with
``fullgraph=True``, joint graph and min-cut partitioner), since inductor takes 30-200 s per network on a small CI
host; tests/test_compile.py runs the same network and policy under inductor and checks it against the eager parent
(``MONAI_CKPT_COMPILE_BACKEND=inductor`` runs this block under inductor too).

Bash blocks hold commands that cost minutes (training a bundle, the whole test suite); each is checked to be, word
for word, the command that a test runs (tests/test_bundle_brain_tissue.py, tests/test_bundles_model_zoo.py) or the
CI entry point, rather than run a second time. A command this file does not know fails the test: run it here or map it.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import io
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
FENCE = re.compile(r"^```(?P<lang>[\w-]*)\n(?P<code>.*?)^```\s*$", re.S | re.M)


@dataclass(frozen=True)
class Block:
    lang: str
    code: str
    line: int  # of the first line of code in README.md
    section: str  # the heading it is under


def readme_blocks(text: str) -> list[Block]:
    blocks = []
    for m in FENCE.finditer(text):
        before = text[: m.start()]
        headings = re.findall(r"^#+ (.+)$", before, re.M)
        blocks.append(Block(m["lang"], m["code"], before.count("\n") + 2, headings[-1] if headings else ""))
    return blocks


BLOCKS = readme_blocks(README.read_text())
PYTHON = [b for b in BLOCKS if b.lang == "python"]
BASH = [b for b in BLOCKS if b.lang == "bash"]


def _id(block: Block) -> str:
    return f"line{block.line}-" + re.sub(r"\W+", "-", block.section).strip("-").lower()


def test_the_readme_blocks_are_found_and_labelled():
    # each fence has a language: a block without one could be code that no test runs
    assert all(b.lang for b in BLOCKS), [b.line for b in BLOCKS if not b.lang]
    assert len(PYTHON) >= 3 and len(BASH) >= 2
    assert {b.lang for b in BLOCKS} <= {"python", "bash", "json", "text"}


@pytest.mark.parametrize("block", PYTHON, ids=_id)
def test_python_block_runs_as_written(block, monkeypatch):
    if "torch.compile(" in block.code:
        backend = os.environ.get("MONAI_CKPT_COMPILE_BACKEND", "aot_eager_decomp_partition")
        monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=backend))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(block.code, f"README.md, line {block.line}", "exec"), {"__name__": "__readme__"})
    printed = out.getvalue()
    if "plan(" in block.code:  # what the README says it prints
        shown = next(b for b in BLOCKS if b.lang == "text" and b.line > block.line).code.splitlines()
        assert shown[0] in printed and "(fits)" in printed, printed  # "without checkpointing: peak 20.52 GiB"
        assert "nothing fits 8 GiB" in printed, printed
        # the least-memory search's result moves by ~1% with the order its timings give it (11.43-11.53 GiB seen)
        said = float(re.search(r"smallest peak reachable is about ([0-9.]+) GiB", block.code)[1])
        found = float(re.search(r"smallest peak reachable is ([0-9.]+) GiB", printed)[1])
        assert abs(found - said) <= 0.02 * said, (found, said)


def _commands(block: Block) -> list[list[str]]:
    """The block's commands as argument lists (comments dropped, ``&&`` chains split)."""
    out = []
    for line in block.code.splitlines():
        line = line.split(" #")[0].strip() if not line.lstrip().startswith("#") else ""
        for part in filter(None, (p.strip() for p in line.split("&&"))):
            out.append(shlex.split(part))
    return out


def _check_pip_install(args: list[str]) -> None:
    # the same torch pin as CI, which must come before monai (DESIGN: an unpinned torch pulls a CUDA build)
    pins = [a for a in args if a.startswith("torch==")]
    assert pins and pins[0] in (REPO / ".ci" / "run").read_text(), args
    assert args[args.index("-e") + 1] == ".", args


def _check_bundle_run(args: list[str]) -> None:
    options = dict(zip(args[4::2], args[5::2]))
    config_file = options.pop("--config_file")
    configs = [Path(c) for c in (ast.literal_eval(config_file) if config_file.startswith("[") else [config_file])]
    if "--bundle_root" in options:  # the quickstart: the brain bundle's train + inference + quickstart configs
        root = Path(options.pop("--bundle_root"))
        assert root == Path("bundles/brain_tissue_segmentation") and not options, args
        assert configs == [root / "configs" / f"{n}.json" for n in ("train", "inference", "quickstart")], configs
        assert all((REPO / c).is_file() for c in configs)
        # tests/test_bundle_brain_tissue.py's brain_trained fixture runs exactly these configs as a subprocess
        bundle_tests = (REPO / "tests" / "test_bundle_brain_tissue.py").read_text()
        assert 'json.dumps(cfg(BRAIN, "train", "inference", "quickstart"))' in bundle_tests
    else:  # "Checkpoint any model-zoo bundle": the override test_bundles_model_zoo runs on a zoo-style bundle
        from test_bundles_model_zoo import OVERRIDE

        assert configs == [Path("configs/train.json")], configs
        assert {k.lstrip("-"): v for k, v in options.items()} == OVERRIDE, options


@pytest.mark.parametrize("block", BASH, ids=_id)
def test_bash_block_is_a_command_a_test_runs(block):
    commands = _commands(block)
    assert commands
    for args in commands:
        if args[:2] == ["pip", "install"]:
            _check_pip_install(args)
        elif args[:4] == ["python", "-m", "monai.bundle", "run"]:
            _check_bundle_run(args)
        elif args == ["bash", ".ci/run"]:
            assert "pytest" in (REPO / ".ci" / "run").read_text()
        else:
            pytest.fail(f"README.md line {block.line}: no test runs {shlex.join(args)!r}: run it here or map it")
