"""The documentation site (mkdocs.yml) covers the package; cheap checks, mkdocs is not run.

`make docs` builds the site with `mkdocs build --strict`; these tests catch what it cannot:
a public package without a reference page, a tutorial left out of the navigation.
"""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
CONFIG = (ROOT / "mkdocs.yml").read_text()


def _nav_files() -> list[str]:
    """The files named in mkdocs.yml's `nav:` section (`- Title: path` lines)."""
    nav = CONFIG.split("\nnav:\n", 1)[1]
    nav = re.split(r"\n(?=\S)", nav, maxsplit=1)[0]  # up to the next top-level key
    return re.findall(r":\s*(\S+\.(?:md|ipynb))\s*$", nav, flags=re.MULTILINE)


def _public_modules() -> list[str]:
    """`ppl_ext` and its public subpackages (found on disk, nothing imported)."""
    package = ROOT / "ppl_ext"
    return ["ppl_ext"] + sorted(
        f"ppl_ext.{path.name}" for path in package.iterdir()
        if (path / "__init__.py").is_file() and not path.name.startswith("_"))


def test_every_nav_entry_exists():
    files = _nav_files()
    assert "index.md" in files and "design.md" in files
    missing = [name for name in files if not (DOCS / name).is_file()]
    assert not missing, f"mkdocs.yml's nav names files that are not in docs/: {missing}"


def test_every_public_module_has_a_reference_page_in_the_nav():
    files = _nav_files()
    for module in _public_modules():
        page = f"reference/{module.rsplit('.', 1)[-1]}.md"
        assert (DOCS / page).is_file() and f"::: {module}\n" in (DOCS / page).read_text(), (
            f"{module} has no API reference page: add docs/{page} with the line "
            f"'::: {module}' and a nav entry under 'API reference' in mkdocs.yml.")
        assert page in files, f"docs/{page} is not in mkdocs.yml's nav."


def test_every_tutorial_is_in_the_nav_and_rendered_without_execution():
    files = _nav_files()
    tutorials = sorted((ROOT / "tutorials").glob("*.ipynb"))
    assert tutorials
    for notebook in tutorials:
        assert f"tutorials/{notebook.name}" in files, f"{notebook.name} is not in the nav."
    assert (DOCS / "tutorials").resolve() == (ROOT / "tutorials").resolve()
    assert re.search(r"mkdocs-jupyter:\n\s+execute: false\n", CONFIG)
