"""Patient- and section-level train/test splits without leakage (SPEC §1.5)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import numpy as np
import pandas as pd

from stpredict._errors import InputError
from stpredict._keys import Attrs
from stpredict._logging import get_logger

if TYPE_CHECKING:
    from anndata import AnnData

__all__ = ["Fold", "make_folds", "section_patients"]

logger = get_logger(__name__)


class Fold(NamedTuple):
    """One train/test split: lists of section ids (list positions, mapping keys or DataFrame index values)."""

    train: list[Any]
    test: list[Any]


def _patient_of(item: Any, patient_key: str, table_key: str) -> Any:
    """The patient of one section, or ``None``.

    Looked up in ``uns``/``attrs`` of the item and of its table (``[patient_key]`` or
    ``["stpredict"][patient_key]``, as :func:`stpredict.io.read_st` writes), then a constant ``obs[patient_key]``.
    """
    from anndata import AnnData

    table: AnnData | None = item if isinstance(item, AnnData) else getattr(item, "tables", {}).get(table_key)
    holders = [getattr(item, "uns", None), getattr(item, "attrs", None), None if table is None else table.uns]
    for holder in holders:
        if not holder:
            continue
        if holder.get(patient_key) is not None:
            return holder[patient_key]
        nested = holder.get(Attrs.root, {})
        if isinstance(nested, Mapping) and nested.get(patient_key) is not None:
            return nested[patient_key]
    if table is not None and patient_key in table.obs:
        values = pd.unique(np.asarray(table.obs[patient_key]))
        if len(values) == 1:
            return values[0]
        msg = f"obs[{patient_key!r}] holds several patients {list(values)[:5]} in one section; split the table."
        raise InputError(msg)
    return None


def section_patients(data: Any, *, patient_key: str = "patient", table_key: str = "table") -> pd.Series:
    """Section id → patient (``None`` where unknown) for the inputs :func:`make_folds` accepts."""
    if isinstance(data, pd.DataFrame):
        if patient_key not in data:
            msg = f"The DataFrame needs a {patient_key!r} column (index = section ids); it has {list(data.columns)}."
            raise KeyError(msg)
        return data[patient_key].copy()
    if isinstance(data, pd.Series):
        return data.copy()
    if isinstance(data, Mapping):
        items = dict(data)
    elif isinstance(data, Sequence) and not isinstance(data, str):
        items = dict(enumerate(data))
    else:
        msg = (
            "make_folds needs several sections: a list or {name: …} mapping of AnnData/SpatialData, or a DataFrame "
            f"of section → patient; got {type(data).__name__}."
        )
        raise TypeError(msg)
    return pd.Series({k: _patient_of(v, patient_key, table_key) for k, v in items.items()}, dtype=object)


def _assign(groups: list[Any], n_folds: int, rng: np.random.Generator) -> list[list[Any]]:
    order = [groups[i] for i in rng.permutation(len(groups))]
    return [list(part) for part in np.array_split(np.array(order, dtype=object), n_folds)]


def make_folds(
    data: Any,
    *,
    by: Literal["patient", "section"] = "patient",
    n_folds: int | None = None,
    test_size: float | None = None,
    seed: int = 0,
    patient_key: str = "patient",
    table_key: str = "table",
    allow_patient_leakage: bool = False,
) -> list[Fold]:
    """Split sections into train/test folds, by patient (default) or by section.

    With ``by="patient"`` all sections of a patient fall on the same side, so no patient is ever in both
    train and test. Patients (or sections) are shuffled with ``seed`` and dealt into folds of nearly equal
    numbers of groups.

    * ``n_folds=None, test_size=None``: one fold per group; for patients this is leave-one-patient-out
      (ST-Net). ``n_folds`` equal to the number of patients gives the same folds.
    * ``n_folds=k``: k-fold cross-validation over groups; every group is tested exactly once
      (TRIPLEX: 8 folds on HER2ST, 4 on cSCC).
    * ``test_size``: one hold-out split; a fraction (< 1) of the groups or a number (≥ 1) of groups
      (rounded, at least one group on each side).

    Parameters
    ----------
    data
        A list or ``{name: …}`` mapping of AnnData/SpatialData (the patient is read from ``uns``/``attrs``
        ``[patient_key]`` or ``["stpredict"][patient_key]``, or a constant ``obs[patient_key]`` column of the
        table), or a DataFrame indexed by section with a ``patient_key`` column, or a Series section → patient.
    by
        Unit of the split.
    n_folds
        Number of folds.
    test_size
        Size of a single hold-out test set; exclusive with ``n_folds``.
    seed
        Seed of the shuffle; the same seed gives the same folds.
    patient_key
        Where the patient id is found.
    table_key
        Table of each SpatialData.
    allow_patient_leakage
        ``by="section"`` refuses to split sections of one patient across train and test (or with patients
        unknown) unless this is ``True``.

    Returns
    -------
    A list of :class:`Fold` ``(train, test)`` of section ids: list positions, mapping keys or DataFrame index
    values, each list sorted in input order. Pass ``fold.train`` as ``fit_on`` to
    :func:`stpredict.pp.select_genes`.

    Raises
    ------
    InputError
        If patients are unknown for ``by="patient"``, a section split would leak a patient, or the
        requested number of folds does not fit the number of groups.
    """
    if by not in ("patient", "section"):
        msg = f"by must be 'patient' or 'section', got {by!r}."
        raise InputError(msg)
    if n_folds is not None and test_size is not None:
        msg = "Pass either n_folds (cross-validation) or test_size (one hold-out split), not both."
        raise InputError(msg)
    patients = section_patients(data, patient_key=patient_key, table_key=table_key)
    sections = list(patients.index)
    unknown = [s for s, p in patients.items() if p is None or (isinstance(p, float) and np.isnan(p))]
    if by == "patient":
        if unknown:
            msg = (
                f"The patient of sections {unknown[:5]} is unknown. Set it (e.g. `adata.uns[{patient_key!r}] = 'A'`, "
                f"or pass a DataFrame of section → {patient_key!r}), or split with `by='section'`."
            )
            raise InputError(msg)
        groups = list(pd.unique(patients.to_numpy()))
    else:
        shared = patients.dropna()[patients.dropna().duplicated(keep=False)]
        if not allow_patient_leakage and (unknown or len(shared)):
            detail = (
                f"sections {list(shared.index)[:6]} share patients {list(pd.unique(shared.to_numpy()))[:4]}"
                if len(shared)
                else f"the patients of sections {unknown[:5]} are unknown"
            )
            msg = (
                f"Splitting by section can put one patient in both train and test: {detail}. Split with "
                "`by='patient'`, or pass `allow_patient_leakage=True` if that is intended."
            )
            raise InputError(msg)
        groups = sections
    n_groups = len(groups)
    if n_groups < 2:
        msg = f"A split needs at least two {by}s; found {n_groups}."
        raise InputError(msg)

    rng = np.random.default_rng(seed)
    if test_size is not None:
        n_test = round(test_size * n_groups) if test_size < 1 else round(test_size)
        if not 1 <= n_test <= n_groups - 1:
            msg = f"test_size={test_size} gives {n_test} of {n_groups} {by}s in test; each side needs at least one."
            raise InputError(msg)
        test_groups = _assign(groups, n_groups, rng)[:n_test]
        folds_groups = [[g for part in test_groups for g in part]]
    else:
        k = n_groups if n_folds is None else int(n_folds)
        if not 2 <= k <= n_groups:
            msg = f"n_folds must be between 2 and the number of {by}s ({n_groups}), got {n_folds}."
            raise InputError(msg)
        folds_groups = _assign(groups, k, rng)

    folds = []
    for test_groups in folds_groups:
        chosen = set(test_groups)
        is_test = [(patients[s] if by == "patient" else s) in chosen for s in sections]
        folds.append(
            Fold(
                train=[s for s, t in zip(sections, is_test, strict=True) if not t],
                test=[s for s, t in zip(sections, is_test, strict=True) if t],
            )
        )
    logger.info("Split %d sections by %s into %d fold(s).", len(sections), by, len(folds))
    return folds
