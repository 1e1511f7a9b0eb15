"""Re-register a Spatial Transcriptomics spot grid to its H&E render when the shipped coordinates miss the tissue.

her2st A2's ``img_x``/``img_y`` (its spot file's ``pixel_x``/``pixel_y`` scaled to the shipped 2000 px render) do
not land on the render's tissue: a third of the spot grid lies on the black background, and across spots the total
count does not follow the tissue at all (Pearson r of log total count with the darkness under the spot, −0.08,
against +0.22 on A1, the neighbouring section of the same patient). Every model scored about 0 on A2 for that
reason, not for want of signal. The render is rotated by about 4.5° against the scan the spots were located on.

The fix estimates the map from array coordinates (``x``, ``y``; a 200 µm lattice) to render pixels, a rotation,
two scales and a shift, as the one under which the array cells of the selected spots (the spots the ST pipeline
found under tissue) best cover the tissue: intersection over union of the union of cells with the tissue mask,
searched on a grid of rotations and shifts and refined by Nelder–Mead. On A1, whose shipped coordinates fit,
the same search moves the spots by a few tens of µm (the method's precision); on A2 it restores the IoU to
A1's level. ``bench_protocol.py`` reads A2 through a copy of its folder whose ``spots.tsv`` holds the registered
coordinates (``img_x_shipped``/``img_y_shipped`` keep the originals) and records the numbers in its JSON.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np


def tissue_of_render(rgb: np.ndarray, *, background_max: float = 60.0) -> np.ndarray:
    """The tissue of a her2st render: the largest non-black component (the annotated inset is dropped)."""
    from scipy import ndimage as ndi

    mask = ndi.binary_opening(rgb.astype(np.float32).sum(-1) > background_max, iterations=2)
    labels, n = ndi.label(mask)
    if n == 0:
        msg = "the render has no tissue (no pixel brighter than the black background)"
        raise ValueError(msg)
    sizes = np.bincount(labels.ravel())[1:]
    return labels == (1 + int(np.argmax(sizes)))


def _iou(params: np.ndarray, tx: np.ndarray, ty: np.ndarray, occupied: np.ndarray, n_spots: int, area: float) -> float:
    """IoU of the spots' array cells under ``params`` with the tissue pixels ``(tx, ty)`` (each of ``area`` px²)."""
    ax, ay, theta, bx, by = params
    if ax <= 0 or ay <= 0:
        return 0.0
    c, s = math.cos(theta), math.sin(theta)
    u, v = tx - bx, ty - by
    xi = np.rint((c * u + s * v) / ax).astype(np.int64)  # the inverse map: pixel → nearest lattice point
    yi = np.rint((-s * u + c * v) / ay).astype(np.int64)
    ok = (xi >= 0) & (yi >= 0) & (xi < occupied.shape[0]) & (yi < occupied.shape[1])
    inter = occupied[xi[ok], yi[ok]].sum() * area
    return float(inter / (n_spots * ax * ay + len(tx) * area - inter))


def apply(params: np.ndarray, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Render pixel coordinates (column, row) of array coordinates ``x``, ``y`` under ``params``."""
    ax, ay, theta, bx, by = params
    c, s = math.cos(theta), math.sin(theta)
    return c * ax * x - s * ay * y + bx, s * ax * x + c * ay * y + by


def register_grid(
    tissue: np.ndarray, x: np.ndarray, y: np.ndarray, img_x: np.ndarray, img_y: np.ndarray, *, step: int = 2
) -> dict[str, Any]:
    """Fit rotation, scales and shift of the array grid to ``tissue``, starting from the shipped coordinates.

    Returns the parameters ``(ax, ay, theta, bx, by)`` (pixels per array step, radians, pixels), the IoU of the
    shipped and registered grids, and the spots' displacement (pixels).
    """
    from scipy import optimize

    x, y = np.asarray(x, np.int64), np.asarray(y, np.int64)
    occupied = np.zeros((x.max() + 3, y.max() + 3), bool)
    occupied[x, y] = True
    ty, tx = np.nonzero(tissue[::step, ::step])
    tx, ty, area = tx * float(step), ty * float(step), float(step * step)
    fx = np.polyfit(x, img_x, 1)  # the shipped coordinates as an axis-aligned map
    fy = np.polyfit(y, img_y, 1)
    p0 = np.array([fx[0], fy[0], 0.0, fx[1], fy[1]])

    def score(p: np.ndarray) -> float:
        return _iou(p, tx, ty, occupied, len(x), area)

    pitch = 0.5 * (fx[0] + fy[0])
    grid = itertools.product(
        np.deg2rad(np.arange(-8.0, 8.1, 1.0)), np.arange(-2.0, 2.01, 0.5) * pitch, np.arange(-3.0, 3.01, 0.5) * pitch
    )  # rotations of ±8°, shifts of ±2 array steps across and ±3 down
    start = max((p0 + np.array([0.0, 0.0, th, dx, dy]) for th, dx, dy in grid), key=score)
    res = optimize.minimize(lambda p: -score(p), start, method="Nelder-Mead", options={"xatol": 0.05, "fatol": 1e-5})
    p = res.x if score(res.x) >= score(start) else start
    rx, ry = apply(p, x, y)
    shift = np.hypot(rx - img_x, ry - img_y)
    return {
        "params": {"ax": float(p[0]), "ay": float(p[1]), "rotation_deg": float(np.rad2deg(p[2])),
                   "bx": float(p[3]), "by": float(p[4])},
        "iou_shipped": score(p0), "iou_registered": score(p),
        "shift_px_median": float(np.median(shift)), "shift_px_max": float(shift.max()),
        "img_x": rx, "img_y": ry,
    }  # fmt: skip


def _darkness_corr(gray: np.ndarray, px: np.ndarray, py: np.ndarray, log_total: np.ndarray, half: int) -> float:
    """Pearson r of the spots' log total count with the darkness of the image under them."""
    h, w = gray.shape
    dark = []
    for cx, cy in zip(px, py, strict=True):
        c0, r0 = int(np.clip(cx - half, 0, w - 1)), int(np.clip(cy - half, 0, h - 1))
        dark.append(-gray[r0 : r0 + 2 * half, c0 : c0 + 2 * half].mean())
    return float(np.corrcoef(log_total, dark)[0, 1])


def registered_folder(src: Path, dest_root: Path) -> tuple[Path, dict[str, Any]]:
    """A copy of the section folder ``src`` under ``dest_root`` with registered spot coordinates, and its record.

    The image, counts and ``meta.json`` are linked, not copied; ``spots.tsv`` is rewritten with ``img_x``/``img_y``
    registered (``img_x_shipped``/``img_y_shipped`` keep the shipped values).
    """
    import pandas as pd
    from PIL import Image

    image = next(p for p in (src / "image.png", src / "image.jpg") if p.exists())
    rgb = np.asarray(Image.open(image).convert("RGB"))
    spots = pd.read_csv(src / "spots.tsv", sep="\t")
    if "selected" in spots:
        spots = spots[spots["selected"] == 1]
    reg = register_grid(tissue_of_render(rgb), spots["x"], spots["y"], spots["img_x"], spots["img_y"])
    counts = pd.read_csv(src / "counts.tsv.gz", sep="\t", index_col=0)
    keep = spots["spot_id"].isin(counts.index).to_numpy()
    log_total = np.log1p(counts.loc[spots["spot_id"][keep]].sum(axis=1).to_numpy())
    gray = rgb.astype(np.float32).mean(-1)
    half = max(2, int(round(json.loads((src / "meta.json").read_text())["spot_diameter_px"] / 3)))
    record = {k: v for k, v in reg.items() if k not in ("img_x", "img_y")} | {
        "darkness_corr_shipped": _darkness_corr(gray, spots["img_x"][keep], spots["img_y"][keep], log_total, half),
        "darkness_corr_registered": _darkness_corr(gray, reg["img_x"][keep], reg["img_y"][keep], log_total, half),
    }
    dest = dest_root / src.name
    dest.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.name != "spots.tsv" and not (dest / f.name).exists():
            os.symlink(f.resolve(), dest / f.name)
    out = spots.assign(img_x_shipped=spots["img_x"], img_y_shipped=spots["img_y"], img_x=reg["img_x"],
                       img_y=reg["img_y"])  # fmt: skip
    out.to_csv(dest / "spots.tsv", sep="\t", index=False)
    return dest, record


if __name__ == "__main__":  # python benchmarks/_registration.py her2st A1 A2: the numbers, for the README
    import sys
    import tempfile

    data = Path(__file__).resolve().parents[2] / "shared" / "data" / sys.argv[1]
    with tempfile.TemporaryDirectory() as tmp:
        for name in sys.argv[2:]:
            _, rec = registered_folder(data / name, Path(tmp))
            print(name, json.dumps(rec, indent=1))
