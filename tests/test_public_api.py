"""Every public name is documented and listed in `__all__`."""

import importlib

import pytest

PACKAGES = ["ppl_ext", "ppl_ext.adev", "ppl_ext.gen", "ppl_ext.vi", "ppl_ext.numpyro"]


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
