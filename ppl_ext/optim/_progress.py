"""The progress bar of `fit` (tqdm, which NumPyro already depends on)."""

from __future__ import annotations

import warnings


def _tqdm_class():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tqdm.auto warns in notebooks without ipywidgets
        from tqdm.auto import tqdm
    return tqdm


class ProgressBar:
    """A bar over `total` steps showing the latest objective estimate.

    It is drawn when created (before `fit` compiles, so a long compilation shows as
    "compiling"), and falls back to the text bar where the notebook widget is missing.
    """

    def __init__(self, total: int, description: str = "px.fit"):
        options = dict(total=total, desc=description, unit="step", dynamic_ncols=True)
        try:
            self._bar = _tqdm_class()(**options)
        except ImportError:  # tqdm.notebook without ipywidgets
            from tqdm.std import tqdm

            self._bar = tqdm(**options)
        self._bar.set_postfix_str("compiling", refresh=True)

    def compiled(self, seconds: float) -> None:
        self._bar.reset()  # the rate shown then counts run time only
        self._bar.set_postfix_str(f"compiled in {seconds:.1f} s", refresh=True)

    def advance(self, steps: int, value: float) -> None:
        self._bar.set_postfix_str(f"objective {value:.5g}", refresh=False)
        self._bar.update(steps)

    def close(self) -> None:
        self._bar.close()
