"""Executes notebooks with the evcxr Rust kernel and fails loudly on the first error cell.

Usage: run_notebooks.py OUT_DIR NOTEBOOK...

Each executed notebook is written to OUT_DIR (the stored ones stay output-free). On failure the
failing cell's source and every output it produced (compiler errors included) are printed.
"""
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError


def show_outputs(cell):
    for out in cell.get("outputs", []):
        if out.get("output_type") == "stream":
            print(out.get("text", ""), end="")
        elif out.get("output_type") == "error":
            print(f"{out.get('ename')}: {out.get('evalue')}")
            print("\n".join(out.get("traceback", [])))
        else:
            data = out.get("data", {})
            print(data.get("text/plain", ""))


def stderr_text(cell) -> str:
    """What a cell wrote to stderr. evcxr reports a `?` error or a panic there (not as an
    error output), so any stderr text fails the notebook unless the cell is tagged
    `allow-stderr`."""
    if "allow-stderr" in cell.get("metadata", {}).get("tags", []):
        return ""
    return "".join(
        o.get("text", "")
        for o in cell.get("outputs", [])
        if o.get("output_type") == "stream" and o.get("name") == "stderr"
    )


def run(path: Path, out_dir: Path) -> bool:
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb, kernel_name="rust", timeout=1800, resources={"metadata": {"path": str(path.parent)}}
    )
    start = time.time()
    ok = True
    try:
        client.execute()
    except CellExecutionError:
        ok = False
    except Exception as e:  # kernel died, timeout, ...
        print(f"   kernel failure: {type(e).__name__}: {e}")
        ok = False
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        errored = any(o.get("output_type") == "error" for o in cell.get("outputs", []))
        if errored or stderr_text(cell):
            ok = False
            print(f"--- cell {i} failed:\n{cell.source}\n--- its output:")
            show_outputs(cell)
            break
    nbformat.write(nb, out_dir / path.name)
    print(f"   {'ok' if ok else 'FAILED'} in {time.time() - start:.0f} s: {path}")
    return ok


def main():
    out_dir = Path(sys.argv[1])
    out_dir.mkdir(parents=True, exist_ok=True)
    results = [run(Path(p), out_dir) for p in sys.argv[2:]]
    failed = results.count(False)
    print(f"notebooks: {len(results) - failed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
