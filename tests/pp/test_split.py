from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from spatialdata import SpatialData

import stpredict as st
from stpredict.errors import InputError
from stpredict.pp._split import Fold, section_patients

# HER2ST-like: patient A has 2 sections, B 3, C 1, D 2
SECTIONS = pd.DataFrame(
    {"patient": ["A", "A", "B", "B", "B", "C", "D", "D"]},
    index=["A1", "A2", "B1", "B2", "B3", "C1", "D1", "D2"],
)


def check_partition(folds: list[Fold], sections: list, patients: pd.Series | None = None) -> None:
    for fold in folds:
        assert sorted(fold.train + fold.test, key=sections.index) == sections
        assert not set(fold.train) & set(fold.test)
        if patients is not None:
            assert not set(patients[fold.train]) & set(patients[fold.test])


def test_leave_one_patient_out_by_default():
    folds = st.pp.make_folds(SECTIONS)
    assert len(folds) == 4
    check_partition(folds, list(SECTIONS.index), SECTIONS["patient"])
    tested = sorted(tuple(f.test) for f in folds)
    assert tested == [("A1", "A2"), ("B1", "B2", "B3"), ("C1",), ("D1", "D2")]
    assert st.pp.make_folds(SECTIONS, n_folds=4) == folds  # n_folds == n_patients is LOPO too


def test_k_fold_by_patient_is_seeded_and_tests_each_patient_once():
    folds = st.pp.make_folds(SECTIONS, n_folds=2, seed=3)
    assert len(folds) == 2
    check_partition(folds, list(SECTIONS.index), SECTIONS["patient"])
    tested = [s for f in folds for s in f.test]
    assert sorted(tested) == sorted(SECTIONS.index)
    assert st.pp.make_folds(SECTIONS, n_folds=2, seed=3) == folds
    seeds = {tuple(tuple(f.test) for f in st.pp.make_folds(SECTIONS, n_folds=2, seed=s)) for s in range(10)}
    assert len(seeds) > 1  # the seed matters


def test_hold_out_split():
    (fold,) = st.pp.make_folds(SECTIONS, test_size=0.25, seed=0)
    assert len(set(SECTIONS["patient"][fold.test])) == 1  # 25 % of 4 patients
    check_partition([fold], list(SECTIONS.index), SECTIONS["patient"])
    (fold2,) = st.pp.make_folds(SECTIONS, test_size=2, seed=0)
    assert len(set(SECTIONS["patient"][fold2.test])) == 2
    with pytest.raises(InputError, match="each side needs at least one"):
        st.pp.make_folds(SECTIONS, test_size=4)


def test_by_section_refuses_patient_leakage():
    with pytest.raises(InputError, match=r"share patients .*by='patient'.*allow_patient_leakage=True"):
        st.pp.make_folds(SECTIONS, by="section", n_folds=3)
    folds = st.pp.make_folds(SECTIONS, by="section", n_folds=3, allow_patient_leakage=True)
    check_partition(folds, list(SECTIONS.index))
    assert [len(f.test) for f in folds] == [3, 3, 2]
    one_each = SECTIONS.drop_duplicates("patient")
    folds = st.pp.make_folds(one_each, by="section")
    assert len(folds) == 4
    check_partition(folds, list(one_each.index), one_each["patient"])


def test_list_of_anndata_and_spatialdata():
    tables = []
    for i, patient in enumerate(["P1", "P1", "P2", "P3"]):
        adata = ad.AnnData(np.zeros((3, 2), dtype=np.float32))
        if i == 0:
            adata.uns["patient"] = patient
        elif i == 1:
            adata.uns["stpredict"] = {"patient": patient}
        else:
            adata.obs["patient"] = patient
        tables.append(adata)
    sdata = SpatialData(tables={"table": ad.AnnData(np.zeros((2, 2), dtype=np.float32))})
    sdata.attrs["patient"] = "P4"
    data = [*tables, sdata]
    assert list(section_patients(data)) == ["P1", "P1", "P2", "P3", "P4"]
    folds = st.pp.make_folds(data)
    assert len(folds) == 4
    assert [0, 1] in [f.test for f in folds]
    named = st.pp.make_folds({"s0": tables[0], "s1": tables[1], "s2": tables[2]}, n_folds=2)
    assert sorted(s for f in named for s in f.test) == ["s0", "s1", "s2"]


def test_unknown_patients():
    data = [ad.AnnData(np.zeros((2, 2), dtype=np.float32)) for _ in range(3)]
    with pytest.raises(InputError, match=r"patient of sections \[0, 1, 2\] is unknown"):
        st.pp.make_folds(data)
    with pytest.raises(InputError, match="unknown"):
        st.pp.make_folds(data, by="section")
    assert len(st.pp.make_folds(data, by="section", allow_patient_leakage=True)) == 3


def test_mixed_patients_in_one_table():
    adata = ad.AnnData(np.zeros((2, 2), dtype=np.float32))
    adata.obs["patient"] = ["A", "B"]
    with pytest.raises(InputError, match="several patients"):
        st.pp.make_folds([adata, adata])


def test_bad_arguments():
    with pytest.raises(InputError, match="n_folds must be between 2"):
        st.pp.make_folds(SECTIONS, n_folds=5)
    with pytest.raises(InputError, match="n_folds must be between 2"):
        st.pp.make_folds(SECTIONS, n_folds=1)
    with pytest.raises(InputError, match="either n_folds"):
        st.pp.make_folds(SECTIONS, n_folds=2, test_size=0.5)
    with pytest.raises(InputError, match="at least two"):
        st.pp.make_folds(SECTIONS.iloc[:2])
    with pytest.raises(InputError, match="by must be"):
        st.pp.make_folds(SECTIONS, by="slide")
    with pytest.raises(KeyError, match="'donor' column"):
        st.pp.make_folds(SECTIONS, patient_key="donor")
    with pytest.raises(TypeError, match="several sections"):
        st.pp.make_folds(ad.AnnData(np.zeros((1, 1), dtype=np.float32)))


def test_seed_reproducible_over_permutations_of_groups():
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"patient": rng.integers(0, 8, 36).astype(str)}, index=[f"s{i}" for i in range(36)])
    folds = st.pp.make_folds(df, n_folds=8, seed=1)
    check_partition(folds, list(df.index), df["patient"])
    assert sum(len(f.test) for f in folds) == 36


def test_reader_layout_table_uns_and_categorical_obs():
    """The layout read_st and the synthetic generator write: table.uns["stpredict"]["patient"], obs["patient"]."""
    sections = {}
    for name in ("A1", "A2", "C2"):
        adata = ad.AnnData(np.zeros((3, 2), dtype=np.float32))
        adata.obs["patient"] = pd.Categorical([name[0]] * 3)
        if name != "A2":
            adata.uns["stpredict"] = {"patient": name[0], "section": name}
        sections[name] = SpatialData(tables={"table": adata})
    assert dict(section_patients(sections)) == {"A1": "A", "A2": "A", "C2": "C"}
    folds = st.pp.make_folds(sections)
    assert sorted(f.test for f in folds) == [["A1", "A2"], ["C2"]]
