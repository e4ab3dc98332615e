"""One vocabulary: public signatures read against the table in CONTRIBUTING.md.

Rules: a PRNG key is `key` and comes first; counts are `num_*` names listed in the table
(never `n`, `K`, `N`); parameter dicts are `params`. Exemptions are interfaces that other
libraries fix (NumPyro's `ELBO.loss(rng_key, param_map, ...)`), each with its reason.
"""

import importlib
import inspect
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ["ppl_ext", "ppl_ext.adev", "ppl_ext.gen", "ppl_ext.vi", "ppl_ext.numpyro",
            "ppl_ext.optim", "ppl_ext.smc", "ppl_ext.gfn",
            "ppl_ext.flows"]
FORBIDDEN = {"n", "N", "K", "rng", "rng_key", "num", "param_map", "prng_key", "seed",
             "n_steps", "n_particles", "n_samples", "nsteps", "log_prob"}
#: (qualified name, parameter): interfaces fixed by another library
EXEMPT = {
    ("ObjectiveLoss.loss", "rng_key"): "NumPyro's ELBO.loss signature (SVI calls it)",
    ("ObjectiveLoss.loss", "param_map"): "NumPyro's ELBO.loss signature",
    ("ObjectiveLoss.loss_with_mutable_state", "rng_key"): "NumPyro's signature",
    ("ObjectiveLoss.loss_with_mutable_state", "param_map"): "NumPyro's signature",
    ("fit", "key"): "px.fit(objective, params, backend, num_steps, key, *args): the key "
                    "comes right before the objective's own arguments (CONTRIBUTING.md)",
}


def vocabulary_table() -> dict[str, str]:
    """`name -> meaning` from the Vocabulary table of CONTRIBUTING.md."""
    text = (ROOT / "CONTRIBUTING.md").read_text()
    section = text.split("## Vocabulary", 1)[1]
    table = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 2 and "`" in cells[0]:
            for name in re.findall(r"`([^`]+)`", cells[0]):
                table[name] = cells[1]
    return table


def public_signatures():
    """`(qualified name, inspect.Signature)` of every public callable and method."""
    out = []
    for package in PACKAGES:
        try:
            module = importlib.import_module(package)
        except ImportError:  # a family not built yet
            continue
        for name in module.__all__:
            obj = getattr(module, name)
            targets = [(name, obj)]
            if inspect.isclass(obj):
                targets += [(f"{name}.{attr}", value) for attr, value in vars(obj).items()
                            if callable(value) and not attr.startswith("_")]
            for qualified, target in targets:
                if not callable(target):
                    continue
                try:
                    out.append((qualified, inspect.signature(target)))
                except (TypeError, ValueError):
                    continue
    return out


SIGNATURES = public_signatures()


def _parameters(signature):
    return [p for p in signature.parameters.values()
            if p.name != "self" and not p.name.startswith("_")
            and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def test_the_table_lists_the_core_names():
    table = vocabulary_table()
    for name in ("key", "params", "num_particles", "num_samples", "num_steps"):
        assert name in table, name


@pytest.mark.parametrize("qualified,signature", SIGNATURES, ids=[q for q, _ in SIGNATURES])
def test_public_signature_uses_the_vocabulary(qualified, signature):
    table = vocabulary_table()
    names = [p.name for p in _parameters(signature)]
    for position, name in enumerate(names):
        exempt = (qualified.split(".", 1)[-1] if qualified.count(".") > 1 else qualified,
                  name)
        if exempt in EXEMPT or (qualified, name) in EXEMPT:
            continue
        assert name not in FORBIDDEN, f"{qualified}({name}): not in the vocabulary"
        if name.startswith("num_"):
            assert name in table, (f"{qualified}({name}): a count not in CONTRIBUTING.md's "
                                   "vocabulary table; add it with its meaning or rename")
        if name == "key":
            assert position == 0, f"{qualified}: `key` must be the first argument"

