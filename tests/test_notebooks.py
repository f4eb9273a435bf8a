"""The notebooks: they run top to bottom (in their reduced setting, NOTEBOOK_QUICK=1), and the committed copies carry
the outputs of a full run, a figure in every section that shows the mechanism, so that they render on a code host.

The kernel is this very interpreter: a kernel spec written to a temporary JUPYTER_PATH under a name of its own, so
nothing is registered globally and no other installed "python3" kernel can be picked up instead.
"""
import base64
import sys
from pathlib import Path

import nbclient
import nbformat
import pytest
from ipykernel.kernelspec import write_kernel_spec

ROOT = Path(__file__).resolve().parent.parent
KERNEL = "cv-papers-tests"
# notebook -> the headings (## ...) of the sections that must show a figure
NOTEBOOKS = {
    "san_attention_bias.ipynb": ["3. One batch", "5. The forward pass", "6. Mask proposals beside their attention-bias",
                                 "7. One [SOS] token", "8. Class scores of every query", "9. Ablation"],
    "ann_non_local.ipynb": ["3. One batch", "4. Pyramid sampling", "5. The attention of one pixel",
                            "6. The cost curve", "7. Ablation"],
}


@pytest.fixture(scope="module")
def jupyter_path(tmp_path_factory):
    folder = tmp_path_factory.mktemp("jupyter")
    write_kernel_spec(folder / "kernels" / KERNEL, overrides={"display_name": "tests", "argv": [
        sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]})
    return folder


def sections(nb):
    """{heading: [code cells]} for the '## ' sections of a notebook."""
    out, current = {}, None
    for cell in nb.cells:
        if cell.cell_type == "markdown" and cell.source.startswith("## "):
            current = out.setdefault(cell.source.splitlines()[0][3:].strip(), [])
        elif cell.cell_type == "code" and current is not None:
            current.append(cell)
    return out


def images(cells):
    return [o["data"]["image/png"] for c in cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]


def section_cells(nb, prefix):
    matches = [cells for heading, cells in sections(nb).items() if heading.startswith(prefix)]
    assert len(matches) == 1, f"no single section '## {prefix}...'"
    return matches[0]


@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_notebook_runs(name, jupyter_path, monkeypatch):
    """Executes the notebook top to bottom in its reduced setting; any cell error fails the test."""
    monkeypatch.setenv("JUPYTER_PATH", str(jupyter_path))
    monkeypatch.setenv("NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name=KERNEL, timeout=240, record_timing=False,
                                     resources={"metadata": {"path": str(ROOT / "notebooks")}})
    client.execute()  # raises CellExecutionError, with the cell and its traceback, on any error
    assert "quick=True" in "".join(o.get("text", "") for o in nb.cells[2].outputs)  # the reduced setting was read
    for prefix in NOTEBOOKS[name]:
        assert images(section_cells(nb, prefix)), f"{name}: section '{prefix}' drew no figure"


@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_committed_notebook_has_outputs(name):
    """The committed notebook is a full run (not the reduced one), executed in order, without errors, with a PNG
    figure in every mechanism section, and small enough to render on a code host."""
    path = ROOT / "notebooks" / name
    assert path.stat().st_size < 1_600_000, f"{name} is {path.stat().st_size / 1e6:.1f} MB"
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), "not executed top to bottom"
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    setup = "".join(o.get("text", "") for o in nb.cells[2].outputs)
    assert "quick=False" in setup, "the committed notebook must be a full run"
    for prefix in NOTEBOOKS[name]:
        figures = images(section_cells(nb, prefix))
        assert figures, f"{name}: section '{prefix}' has no figure"
        assert all(base64.b64decode(f)[:8] == b"\x89PNG\r\n\x1a\n" for f in figures)
