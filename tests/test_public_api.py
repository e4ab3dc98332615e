"""Every public name is documented and listed in `__all__`; `import ppl_ext` stays light."""

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

_ROOT = Path(__file__).resolve().parent.parent / "ppl_ext"
#: `ppl_ext` and its public subpackages (a new one is checked without editing this list).
PACKAGES = ["ppl_ext"] + sorted(
    f"ppl_ext.{path.name}" for path in _ROOT.iterdir()
    if (path / "__init__.py").is_file() and not path.name.startswith("_"))


@pytest.mark.parametrize("package", PACKAGES)
def test_public_names_have_docstrings(package):
    module = importlib.import_module(package)
    assert module.__doc__
    for name in module.__all__:
        obj = getattr(module, name)
        if isinstance(obj, (int, float, str)):
            continue
        doc = type(obj).__doc__ if not callable(obj) or not hasattr(obj, "__name__") else obj.__doc__
        assert doc and doc.strip(), f"{package}.{name} has no docstring"


@pytest.mark.parametrize("package", PACKAGES)
def test_all_lists_the_public_names(package):
    module = importlib.import_module(package)
    assert len(set(module.__all__)) == len(module.__all__)
    assert set(module.__all__) <= set(dir(module))


def test_import_does_not_load_arviz_or_genjax():
    """arviz (about a second) and genjax load on first use of their adapters only."""
    code = ("import sys, ppl_ext as px\n"
            "heavy = {'arviz', 'genjax', 'matplotlib', 'xarray', 'pandas'}\n"
            "print(sorted(heavy & set(sys.modules)))\n"
            "assert 'GenJAXModel' in px.gen.__all__\n"
            "assert 'to_inference_data' in px.numpyro.__all__\n"
            "assert px.numpyro.to_inference_data.__module__ == 'ppl_ext.numpyro._arviz'\n"
            "assert px.gen.GenJAXModel.__module__ == 'ppl_ext.gen._genjax'\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.splitlines() == ["[]"], result.stdout + result.stderr


def test_lazy_names_are_importable_and_unknown_names_raise():
    from ppl_ext.gen import GenJAXModel, to_genjax_distribution  # noqa: F401
    from ppl_ext.numpyro import to_inference_data  # noqa: F401

    import ppl_ext as px

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        px.numpyro.nope  # noqa: B018
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        px.gen.nope  # noqa: B018
