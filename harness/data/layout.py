"""Writing data sets in the CheXpert layout: the phantom and generate both write their split files here.

Its own module so that the writers (phantom, generate) and the loaders (datasets) do not import
each other.
"""

from __future__ import annotations

from pathlib import Path


def write_csv(path, header: list[str], rows: list[dict]) -> None:
    """Write rows as a CSV the loaders read (the CheXpert split files are written this way)."""
    import csv

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=header, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
