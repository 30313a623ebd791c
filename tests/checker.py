"""The test suite runs every hint of the checked packages (pyproject's `--jaxtyping-packages`).

`unchecked()` runs a block without that checker: what a user, who runs none, meets. Tests of a
function's own checks (the clear errors for input its hints exclude) call it inside.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import jaxtyping


@contextmanager
def unchecked() -> Iterator[None]:
    """Calls inside skip jaxtyping's checker; the setting is restored on exit."""
    was = jaxtyping.config.jaxtyping_disable
    jaxtyping.config.update("jaxtyping_disable", True)
    try:
        yield
    finally:
        jaxtyping.config.update("jaxtyping_disable", was)
