"""Where the package's data folders live: inside the wheel, or at the repository root."""

from pathlib import Path


def resource_dir(name: str) -> Path:
    """`model_maps` or `configs`: packaged copy if installed as a wheel, else the repo's folder."""
    here = Path(__file__).resolve().parent
    for candidate in (here / name, here.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"cannot find the {name}/ folder next to {here}")
