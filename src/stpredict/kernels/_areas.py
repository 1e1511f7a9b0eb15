"""Exact areas of discs and polygons intersected with pixels (axis-aligned rectangles), as numba functions.

:func:`circle_pixel_area` integrates the disc's chords over the rectangle's corners, :func:`polygon_pixel_area`
clips a ring to the rectangle (Sutherland–Hodgman) and takes its shoelace area, and ``_circle_weights`` fills the
pixel weights of a disc over a window, bit-identical to :func:`circle_pixel_area` with its transcendental terms
computed once per corner row and column. They are exact (no fastmath), for the shape kernels and their tests.
"""

from __future__ import annotations

import math

import numba
import numpy as np

__all__ = ["circle_pixel_area", "polygon_pixel_area"]


@numba.njit(inline="always")
def _prim(t, r):
    # ∫ sqrt(r² - t²) dt for t in [-r, r]
    s = math.sqrt(max(r * r - t * t, 0.0))
    return 0.5 * (t * s + r * r * math.asin(min(1.0, max(-1.0, t / r))))


@numba.njit(inline="always")
def _chord_integral(a, b, r):
    # ∫_a^b sqrt(r² - t²) dt with a, b clamped to [-r, r]
    a = min(max(a, -r), r)
    b = min(max(b, -r), r)
    if b <= a:
        return 0.0
    return _prim(b, r) - _prim(a, r)


@numba.njit(cache=True, fastmath=False)  # never inherit a caller's fastmath (numba would)
def _quadrant(x, y, r):
    # Area of the disc of radius r at the origin with X <= x and Y <= y.
    if x <= -r or y <= -r:
        return 0.0
    xc = min(x, r)
    if y >= r:
        return 2.0 * _chord_integral(-r, xc, r)
    w = math.sqrt(r * r - y * y)
    if y >= 0.0:
        # integrand 2 s(t) for |t| > w, y + s(t) for |t| <= w
        area = 2.0 * _chord_integral(-r, min(xc, -w), r)
        if xc > -w:
            hi = min(xc, w)
            area += y * (hi + w) + _chord_integral(-w, hi, r)
        if xc > w:
            area += 2.0 * _chord_integral(w, xc, r)
        return area
    # y < 0: integrand y + s(t) for |t| < w, else 0
    if xc <= -w:
        return 0.0
    hi = min(xc, w)
    return y * (hi + w) + _chord_integral(-w, hi, r)


@numba.njit(cache=True, fastmath=False)  # never inherit a caller's fastmath (numba would)
def circle_pixel_area(cx, cy, r, x0, y0, x1, y1):
    """Exact area of the disc ``(cx, cy, r)`` intersected with the rectangle ``[x0, x1) × [y0, y1)``."""
    if r <= 0.0:
        return 0.0
    ax0 = x0 - cx
    ax1 = x1 - cx
    ay0 = y0 - cy
    ay1 = y1 - cy
    return max(0.0, _quadrant(ax1, ay1, r) - _quadrant(ax0, ay1, r) - _quadrant(ax1, ay0, r) + _quadrant(ax0, ay0, r))


@numba.njit(cache=True, fastmath=False)  # never inherit a caller's fastmath (numba would)
def _clip_area(xs, ys, x0, y0, x1, y1, bx, by, tx, ty):
    # Sutherland–Hodgman clip of the ring (xs, ys) to the convex box; returns the signed shoelace area.
    # bx, by, tx, ty are scratch buffers of length >= 2 * len(xs) + 8.
    n = xs.size
    for i in range(n):
        bx[i] = xs[i]
        by[i] = ys[i]
    for edge in range(4):
        m = 0
        for i in range(n):
            px = bx[i]
            py = by[i]
            qx = bx[(i + 1) % n]
            qy = by[(i + 1) % n]
            if edge == 0:
                pin = px >= x0
                qin = qx >= x0
            elif edge == 1:
                pin = px <= x1
                qin = qx <= x1
            elif edge == 2:
                pin = py >= y0
                qin = qy >= y0
            else:
                pin = py <= y1
                qin = qy <= y1
            if pin:
                tx[m] = px
                ty[m] = py
                m += 1
            if pin != qin:
                if edge == 0 or edge == 1:
                    xe = x0 if edge == 0 else x1
                    f = (xe - px) / (qx - px)
                    tx[m] = xe
                    ty[m] = py + f * (qy - py)
                else:
                    ye = y0 if edge == 2 else y1
                    f = (ye - py) / (qy - py)
                    tx[m] = px + f * (qx - px)
                    ty[m] = ye
                m += 1
        n = m
        for i in range(n):
            bx[i] = tx[i]
            by[i] = ty[i]
        if n == 0:
            return 0.0
    area = 0.0
    for i in range(n):
        j = (i + 1) % n
        area += bx[i] * by[j] - bx[j] * by[i]
    return 0.5 * area


@numba.njit(cache=True, fastmath=False)  # never inherit a caller's fastmath (numba would)
def polygon_pixel_area(xs, ys, x0, y0, x1, y1):
    """Exact (unsigned) area of a simple polygon ring ``(xs, ys)`` intersected with ``[x0, x1) × [y0, y1)``."""
    m = 2 * xs.size + 8
    bx = np.empty(m)
    by = np.empty(m)
    tx = np.empty(m)
    ty = np.empty(m)
    return abs(_clip_area(xs, ys, x0, y0, x1, y1, bx, by, tx, ty))


@numba.njit(inline="always")
def _ci_pre(a, pa, b, pb, r):
    # _chord_integral(a, b, r) with _prim of the clamped a and b given
    a = min(max(a, -r), r)
    b = min(max(b, -r), r)
    if b <= a:
        return 0.0
    return pb - pa


@numba.njit(inline="always")
def _quadrant_pre(x, y, r, xc, pxc, w, pw, pmw, pmr):
    # _quadrant(x, y, r) step for step, with the square roots and arcsines of its chord integrals precomputed:
    # xc = min(x, r) and pxc = _prim(clamped xc) per corner column; w = sqrt(r² - y²), pw, pmw = _prim(clamped ±w)
    # per corner row; pmr = _prim(-r). Every _prim argument of _quadrant is one of -r, xc, ±w (min picks one).
    if x <= -r or y <= -r:
        return 0.0
    if y >= r:
        return 2.0 * _ci_pre(-r, pmr, xc, pxc, r)
    if y >= 0.0:
        lo = min(xc, -w)
        area = 2.0 * _ci_pre(-r, pmr, lo, pxc if lo == xc else pmw, r)
        if xc > -w:
            hi = min(xc, w)
            area += y * (hi + w) + _ci_pre(-w, pmw, hi, pxc if hi == xc else pw, r)
        if xc > w:
            area += 2.0 * _ci_pre(w, pw, xc, pxc, r)
        return area
    if xc <= -w:
        return 0.0
    hi = min(xc, w)
    return y * (hi + w) + _ci_pre(-w, pmw, hi, pxc if hi == xc else pw, r)


@numba.njit(cache=True, nogil=True, fastmath=False)  # exact areas: no reassociation
def _circle_weights(cx, cy, r, gx0, gy0, h, w, weights):
    # weights[i, j] = circle_pixel_area(cx, cy, r, gx0 + j, gy0 + i, gx0 + j + 1, gy0 + i + 1), bit for bit: the
    # same quadrant terms, with the transcendental parts computed once per corner column and row instead of for
    # each of the four corners of each pixel the circle cuts.
    if not r > 0.0:  # an empty circle covers nothing (as circle_pixel_area says)
        return
    r2 = r * r
    xs = np.empty(w + 1)
    xc = np.empty(w + 1)
    pxc = np.empty(w + 1)
    for j in range(w + 1):
        xs[j] = (gx0 + j) - cx
        xc[j] = min(xs[j], r)
        pxc[j] = _prim(min(max(xc[j], -r), r), r) if xs[j] > -r else 0.0
    ys = np.empty(h + 1)
    wr = np.empty(h + 1)
    pw = np.empty(h + 1)
    pmw = np.empty(h + 1)
    for i in range(h + 1):
        ys[i] = (gy0 + i) - cy
        if -r < ys[i] < r:
            wr[i] = math.sqrt(r * r - ys[i] * ys[i])
            pw[i] = _prim(min(max(wr[i], -r), r), r)
            pmw[i] = _prim(min(max(-wr[i], -r), r), r)
        else:
            wr[i] = pw[i] = pmw[i] = 0.0
    pmr = _prim(-r, r)
    for i in range(h):
        py = gy0 + i
        fy = max(abs(py - cy), abs(py + 1.0 - cy))
        ny_ = max(0.0, max(py - cy, cy - py - 1.0))
        # Along a row, "whole pixel inside" and "pixel touches the disc" each hold on one run of columns (the
        # pixel's farthest and nearest x distances to the centre fall, then rise), so the row is scanned from both
        # ends up to the inside run, which is filled with 1 without testing its pixels. Every pixel is classified
        # by the same tests as in circle_pixel_area, so the weights stay bit-identical to it.
        j = 0
        while j < w and not _inside(gx0 + j, cx, fy, r2):
            if _touches(gx0 + j, cx, ny_, r2):
                weights[i, j] = _cut_area(i, j, xs, ys, r, xc, pxc, wr, pw, pmw, pmr)
            j += 1
        if j == w:
            continue
        k = w - 1
        while not _inside(gx0 + k, cx, fy, r2):
            if _touches(gx0 + k, cx, ny_, r2):
                weights[i, k] = _cut_area(i, k, xs, ys, r, xc, pxc, wr, pw, pmw, pmr)
            k -= 1
        weights[i, j : k + 1] = 1.0


@numba.njit(inline="always")
def _inside(px, cx, fy, r2):
    # the whole pixel [px, px + 1) × row lies in the disc (its farthest corner does)
    fx = max(abs(px - cx), abs(px + 1.0 - cx))
    return fx * fx + fy * fy <= r2


@numba.njit(inline="always")
def _touches(px, cx, ny_, r2):
    # the pixel's nearest point lies strictly inside the disc
    nx_ = max(0.0, max(px - cx, cx - px - 1.0))
    return nx_ * nx_ + ny_ * ny_ < r2


@numba.njit(inline="always")
def _cut_area(i, j, xs, ys, r, xc, pxc, wr, pw, pmw, pmr):
    # circle_pixel_area of window pixel (i, j), from the precomputed corner terms
    q11 = _quadrant_pre(xs[j + 1], ys[i + 1], r, xc[j + 1], pxc[j + 1], wr[i + 1], pw[i + 1], pmw[i + 1], pmr)
    q01 = _quadrant_pre(xs[j], ys[i + 1], r, xc[j], pxc[j], wr[i + 1], pw[i + 1], pmw[i + 1], pmr)
    q10 = _quadrant_pre(xs[j + 1], ys[i], r, xc[j + 1], pxc[j + 1], wr[i], pw[i], pmw[i], pmr)
    q00 = _quadrant_pre(xs[j], ys[i], r, xc[j], pxc[j], wr[i], pw[i], pmw[i], pmr)
    return max(0.0, q11 - q01 - q10 + q00)
