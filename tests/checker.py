"""The test suite runs every hint of the checked packages (pyproject's `--jaxtyping-packages`).

`unchecked()` runs a block without that checker: what a user, who runs none, meets. Tests of a
function's own checks (the clear errors for input its hints exclude) call it inside.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import jaxtyping
from beartype import BeartypeConf, beartype


@contextmanager
def unchecked() -> Iterator[None]:
    """Calls inside skip jaxtyping's checker; the setting is restored on exit."""
    was = jaxtyping.config.jaxtyping_disable
    jaxtyping.config.update("jaxtyping_disable", True)
    try:
        yield
    finally:
        jaxtyping.config.update("jaxtyping_disable", was)


# The checker pyproject's addopts name: beartype, reading `float` as PEP 484 does (an int is a
# float: `alpha: float` takes 1), as mypy and the hints' readers do.
typechecker = beartype(conf=BeartypeConf(is_pep484_tower=True))
