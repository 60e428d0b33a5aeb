"""Run the tutorials in quick mode and store their outputs in the notebooks, for the documentation site.

    python docs/scripts/execute_notebooks.py                    # every notebook in notebooks/
    python docs/scripts/execute_notebooks.py 02_policies_tradeoff

The site renders the outputs stored in each notebook (myst-nb, no execution at build time), so after changing a
notebook, a plot or anything a notebook prints, run this and commit the notebooks. It runs each notebook as
tests/test_notebooks.py does (``MONAI_CKPT_QUICK=1``: tiny sizes, seconds per notebook; inline figures; one
thread; a temporary working folder, so nothing is written beside the notebooks), drops what would only be noise
on a page (stderr: warnings and progress bars, which also name the machine's own install paths; execution
timestamps), writes the repository's own paths relative to it, and refuses to store an error or an oversized output.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import nbclient
import nbformat

REPO = Path(__file__).resolve().parents[2]
NOTEBOOKS = REPO / "notebooks"
MAX_OUTPUT_BYTES = 400_000  # a few plots; a larger output is a mistake to fix, not a page to publish


def clean_outputs(nb: nbformat.NotebookNode) -> None:
    """Drop stderr streams; write paths inside the repository relative to it (``bundles/...``)."""
    root = f"{REPO}{os.sep}"
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        cell.outputs = [o for o in cell.outputs if not (o.output_type == "stream" and o.name == "stderr")]
        for o in cell.outputs:
            if o.output_type == "stream":
                o.text = o.text.replace(root, "")
            elif "text/plain" in o.get("data", {}):
                o.data["text/plain"] = o.data["text/plain"].replace(root, "")


def execute(path: Path) -> int:
    """Execute ``path`` in quick mode, store its outputs in it; returns the size of the outputs in bytes."""
    nb = nbformat.read(path, as_version=4)
    env = {"MONAI_CKPT_QUICK": "1", "MPLBACKEND": "module://matplotlib_inline.backend_inline", "OMP_NUM_THREADS": "1",
           "TQDM_DISABLE": "1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        with tempfile.TemporaryDirectory() as work:
            nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", record_timing=False,
                                    resources={"metadata": {"path": work}}).execute()
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    errors = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs if o.output_type == "error"]
    if errors:
        raise RuntimeError(f"{path.name}: {errors[0].ename}: {errors[0].evalue}")
    clean_outputs(nb)
    size = sum(len(nbformat.writes(nbformat.v4.new_notebook(cells=[c]))) for c in nb.cells if c.cell_type == "code")
    if size > MAX_OUTPUT_BYTES:
        raise RuntimeError(f"{path.name}: {size} bytes of outputs, more than {MAX_OUTPUT_BYTES}: shrink the figures")
    nbformat.validate(nb)
    tmp = path.with_suffix(".ipynb.tmp")
    nbformat.write(nb, tmp)
    tmp.replace(path)
    return size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="notebook names (without .ipynb); default: all")
    args = parser.parse_args(argv)
    paths = [NOTEBOOKS / f"{n.removesuffix('.ipynb')}.ipynb" for n in args.names] or sorted(NOTEBOOKS.glob("*.ipynb"))
    for path in paths:
        if not path.is_file():
            parser.error(f"no notebook {path}")
    for path in paths:
        print(f"{path.name}: {execute(path) / 1000:.0f} kB of outputs", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
