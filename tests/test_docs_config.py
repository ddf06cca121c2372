"""The documentation's configuration refers to files that exist."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _fast_examples():
    # Read the tuple without executing conf.py (which imports torch and
    # writes the generated API pages).
    tree = ast.parse((ROOT / "docs" / "conf.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            getattr(target, "id", None) == "FAST_EXAMPLES" for target in node.targets
        ):
            return ast.literal_eval(node.value)
    raise AssertionError("docs/conf.py defines no FAST_EXAMPLES")


def test_fast_gallery_examples_exist():
    # A renamed example would silently drop out of the executed gallery (the
    # filename pattern would just match nothing), leaving it without figures.
    names = _fast_examples()
    assert names
    for name in names:
        path = ROOT / "examples" / f"{name}.py"
        assert path.is_file(), f"FAST_EXAMPLES names {name!r}, but {path} is missing"
        # sphinx-gallery runs a file only if its docstring has a title.
        assert re.match(r'\s*"""\s*\n(=+\n)?[^\n]+\n=+\n', path.read_text())
