import os
import shutil

from conftest import REPO

def test_walkthrough_runs_top_to_bottom(tiny_checkpoint, tiny_dataset, tmp_path, monkeypatch):
    """A fresh copy of walkthrough.ipynb, run headless on the tiny checkpoint as out/ckpt.pt (its dataset beside it):
    every code cell runs without an error, and every cell that draws shows an image."""
    import nbformat
    from nbclient import NotebookClient

    (tmp_path / "out").mkdir()
    shutil.copy(tiny_checkpoint, tmp_path / "out" / "ckpt.pt")
    os.symlink(tiny_dataset, tmp_path / "data")
    notebook = nbformat.read(os.path.join(REPO, "walkthrough.ipynb"), as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None  # a fresh copy: whatever was committed does not count
    monkeypatch.setenv("PYTHONPATH", REPO)  # the kernel imports the repository's modules from there
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert len(code) == 7 and all(cell.execution_count for cell in code)
    assert not [o for cell in code for o in cell.outputs if o.output_type == "error"]
    drawn = [sum("image/png" in o.get("data", {}) for o in cell.outputs) for cell in code]
    assert drawn[0] == 0 and all(n >= 1 for n in drawn[1:6]) and drawn[1] == 2 and drawn[6] == 1, drawn
    assert "out/ckpt.pt" in "".join(o.get("text", "") for o in code[0].outputs)  # it found the checkpoint by itself
