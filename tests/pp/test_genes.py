from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import sparse
from spatialdata import SpatialData
from spatialdata.models import TableModel

import stpredict as st
from stpredict.errors import InputError
from stpredict.pp._genes import as_sections, subset_genes


def table(counts: np.ndarray, genes: list[str], *, as_sparse: bool = True) -> ad.AnnData:
    X = sparse.csr_matrix(counts.astype(np.float32)) if as_sparse else counts.astype(np.float32)
    return ad.AnnData(
        X,
        obs=pd.DataFrame(index=[f"u{i}" for i in range(counts.shape[0])]),
        var=pd.DataFrame(index=genes),
    )


@pytest.fixture
def sections() -> list[ad.AnnData]:
    rng = np.random.default_rng(0)
    genes = [f"g{i:02d}" for i in range(30)]
    means = np.linspace(0.5, 15, 30)
    return [table(rng.poisson(rng.permutation(means), (n, 30)), genes) for n in (40, 10, 25)]


def pooled_top(tables: list[ad.AnnData], n_top: int) -> list[str]:
    """Brute-force reference: concatenate all units, mean per gene, sort."""
    shared = sorted(set.intersection(*(set(t.var_names) for t in tables)))
    stacked = np.vstack([t[:, shared].X.toarray() for t in tables])
    means = stacked.mean(axis=0)
    return [g for _, g in sorted(zip(-means, shared, strict=True))][:n_top]


def test_mean_is_pooled_over_all_units(sections):
    genes = st.pp.select_genes(sections, n_top=10)
    assert genes == pooled_top(sections, 10)
    # pooled mean, not the mean of per-section means: the two rankings differ on this data
    per_section = np.mean([np.asarray(t.X.mean(axis=0)).ravel() for t in sections], axis=0)
    by_section_mean = list(sections[0].var_names[np.argsort(-per_section, kind="stable")[:10]])
    assert by_section_mean != genes


def test_fit_on_training_sections(sections):
    train = st.pp.select_genes(sections, n_top=10, fit_on=[0, 2])
    assert train == pooled_top([sections[0], sections[2]], 10)
    assert st.pp.select_genes(sections, n_top=10, fit_on=[True, False, True]) == train
    assert st.pp.select_genes(sections, n_top=10, fit_on="all") == st.pp.select_genes(sections, n_top=10)
    assert train != st.pp.select_genes(sections, n_top=10, fit_on=[1])


def test_fold_from_split_feeds_fit_on(sections):
    for i, t in enumerate(sections):
        t.uns["patient"] = "AAB"[i]
    (fold,) = st.pp.make_folds(sections, test_size=1, seed=0)
    genes = st.pp.select_genes(sections, n_top=5, fit_on=fold.train)
    assert genes == pooled_top([sections[i] for i in fold.train], 5)


@pytest.mark.filterwarnings("ignore:The table is annotating 'spots':UserWarning")
def test_mapping_section_key_and_spatialdata_inputs(sections):
    named = {"A1": sections[0], "B1": sections[1]}
    assert st.pp.select_genes(named, n_top=5, fit_on=["B1"]) == pooled_top([sections[1]], 5)
    pooled = ad.concat(sections[:2], index_unique="-")
    pooled.obs["section"] = ["a"] * 40 + ["b"] * 10
    assert st.pp.select_genes(pooled, n_top=5, section_key="section", fit_on=["b"]) == pooled_top([sections[1]], 5)
    assert len(as_sections(pooled, section_key="section")["a"]) == 40
    adata = sections[0].copy()
    adata.obs["region"] = pd.Categorical(["spots"] * adata.n_obs)
    adata.obs["instance_id"] = np.arange(adata.n_obs)
    sdata = SpatialData(
        tables={"table": TableModel.parse(adata, region="spots", region_key="region", instance_key="instance_id")}
    )
    assert st.pp.select_genes(sdata, n_top=5) == pooled_top([sections[0]], 5)
    with pytest.raises(KeyError, match="available tables"):
        st.pp.select_genes(sdata, table_key="counts")


def test_only_genes_in_every_fitted_section_are_candidates(sections):
    rng = np.random.default_rng(1)
    extra = table(rng.poisson(100, (5, 31)), [*sections[0].var_names, "only_here"])
    genes = st.pp.select_genes([sections[0], extra], n_top=30)
    assert "only_here" not in genes
    assert sorted(genes) == sorted(sections[0].var_names)
    with pytest.raises(InputError, match="Only 30 genes are measured in every fitted section"):
        st.pp.select_genes([sections[0], extra], n_top=31)


def test_ties_broken_by_name():
    t = table(np.ones((3, 4)), ["d", "b", "c", "a"])
    assert st.pp.select_genes(t, n_top=3) == ["a", "b", "c"]


def test_highly_variable_prefers_overdispersed_genes():
    rng = np.random.default_rng(0)
    n = 300
    poisson = rng.poisson(20, (n, 20))  # high mean, no extra variance
    pattern = np.where(rng.random(n) < 0.2, 30, 0)  # a spatial domain expressing 3 genes
    overdispersed = rng.poisson(pattern[:, None] + 0.5, (n, 3))
    counts = np.hstack([poisson, overdispersed])
    genes = [f"p{i}" for i in range(20)] + ["hv0", "hv1", "hv2"]
    halves = [table(counts[:150], genes), table(counts[150:], genes)]
    assert sorted(st.pp.select_genes(halves, n_top=3, method="highly_variable")) == ["hv0", "hv1", "hv2"]
    assert not set(st.pp.select_genes(halves, n_top=3, method="mean")) & {"hv0", "hv1", "hv2"}


@pytest.mark.parametrize(
    ("counts", "match"),
    [
        (np.array([[1.5, 2.0], [0.0, 1.0]]), "non-integer"),
        (np.array([[-1.0, 2.0], [0.0, 1.0]]), "negative"),
        (np.array([[np.nan, 2.0], [0.0, 1.0]]), "NaN"),
    ],
)
def test_bad_counts(counts, match):
    t = table(counts, ["a", "b"], as_sparse=False)
    before = t.X.copy()
    with pytest.raises(InputError, match=match):
        st.pp.select_genes(t, n_top=1)
    np.testing.assert_array_equal(t.X, before)


def test_bad_gene_names():
    dup = table(np.ones((2, 2)), ["a", "b"])
    dup.var_names = ["a", "a"]
    with pytest.raises(InputError, match="duplicated"):
        st.pp.select_genes(dup, n_top=1)
    empty = table(np.ones((2, 2)), ["a", "b"])
    empty.var_names = ["a", ""]
    with pytest.raises(InputError, match="missing or empty"):
        st.pp.select_genes(empty, n_top=1)


def test_bad_arguments(sections):
    with pytest.raises(InputError, match="fit_on='train'"):
        st.pp.select_genes(sections, fit_on="train")
    with pytest.raises(InputError, match="not in the data"):
        st.pp.select_genes(sections, fit_on=[5])
    with pytest.raises(InputError, match="method"):
        st.pp.select_genes(sections, method="variance")
    with pytest.raises(InputError, match="n_top"):
        st.pp.select_genes(sections, n_top=0)


@pytest.mark.parametrize("as_sparse", [True, False], ids=["sparse", "dense"])
def test_subset_genes_zero_fills_and_warns(as_sparse, caplog):
    t = table(np.arange(6).reshape(2, 3), ["a", "b", "c"], as_sparse=as_sparse)
    t.layers["raw"] = t.X.copy()
    t.obsm["spatial"] = np.zeros((2, 2))
    t.uns["patient"] = "A"
    with caplog.at_level("WARNING", logger="stpredict"):
        out = subset_genes(t, genes=["c", "x", "a"])
    assert "1 of 3 genes are not measured" in caplog.text
    dense = out.X.toarray() if sparse.issparse(out.X) else out.X
    np.testing.assert_array_equal(dense, [[2, 0, 0], [5, 0, 3]])
    assert sparse.issparse(out.X) == as_sparse
    assert out.X.dtype == np.float32
    assert list(out.var_names) == ["c", "x", "a"]
    assert list(out.var["stpredict_missing"]) == [False, True, False]
    layer = out.layers["raw"].toarray() if as_sparse else out.layers["raw"]
    np.testing.assert_array_equal(layer, dense)
    assert out.uns["patient"] == "A"
    assert t.shape == (2, 3)  # the input is untouched
    with pytest.raises(InputError, match="1 of 3 genes are not in the table"):
        subset_genes(t, genes=["c", "x", "a"], missing="raise")
    with pytest.raises(InputError, match="duplicated"):
        subset_genes(t, genes=["a", "a"])


def test_subset_genes_keeps_var_when_all_present():
    t = table(np.ones((2, 3)), ["a", "b", "c"])
    t.var["symbol"] = ["A", "B", "C"]
    out = subset_genes(t, genes=["b", "a"])
    assert list(out.var["symbol"]) == ["B", "A"]


def _spatially_variable_counts(rng: np.random.Generator, n_units: int, n_genes: int = 60) -> np.ndarray:
    """Poisson counts; genes 0-9 are raised, 3 to 8 times, in a domain of about 30 % of the units."""
    lam = np.outer(rng.gamma(4.0, 0.25, n_units), rng.gamma(1.0, 3.0, n_genes))
    domain = rng.random(n_units) < 0.3
    lam[domain, :10] *= np.linspace(3, 8, 10)
    counts = rng.poisson(lam).astype(np.float32)
    counts[:, 50] = 0  # a gene never detected
    return counts


GENES60 = [f"g{i:02d}" for i in range(60)]


@pytest.mark.parametrize("n_top", [5, 12, 40])
def test_highly_variable_is_scanpy_with_one_batch_per_section(n_top):
    import scanpy as sc

    rng = np.random.default_rng(3)
    batches = [table(_spatially_variable_counts(rng, 100), GENES60) for _ in range(2)]  # equal sizes: see below
    pooled = ad.concat(batches, index_unique="-")
    pooled.obs["section"] = pd.Categorical(["0"] * 100 + ["1"] * 100)
    expected = sc.experimental.pp.highly_variable_genes(
        pooled, flavor="pearson_residuals", n_top_genes=n_top, batch_key="section", inplace=False
    )
    ours = st.pp.select_genes(batches, n_top=n_top, method="highly_variable")
    assert set(ours) == set(expected.index[expected["highly_variable"]])
    # best first, in scanpy's order: sections in which a gene is in the top n_top, then its median rank there
    best_first = expected.sort_values(
        ["highly_variable_nbatches", "highly_variable_rank"], ascending=[False, True], kind="stable"
    )
    assert ours == list(best_first.index[:n_top])
    assert set(ours[:5]) <= set(GENES60[:10])  # spatially variable genes lead


def test_highly_variable_one_section_ranks_by_scanpy_residual_variance():
    import scanpy as sc

    t = table(_spatially_variable_counts(np.random.default_rng(5), 80), GENES60)
    expected = sc.experimental.pp.highly_variable_genes(t, flavor="pearson_residuals", n_top_genes=8, inplace=False)
    by_variance = expected["residual_variances"].sort_values(ascending=False, kind="stable")
    assert st.pp.select_genes(t, n_top=8, method="highly_variable") == list(by_variance.index[:8])


def test_highly_variable_clips_each_section_by_its_own_size():
    """Scanpy's ``batch_key`` clips all batches at sqrt(n) of the first one (scverse/scanpy#4138); we do not."""
    import scanpy as sc

    rng = np.random.default_rng(11)
    big = table(_spatially_variable_counts(rng, 300), GENES60)
    small = table(_spatially_variable_counts(rng, 12), GENES60)
    genes = st.pp.select_genes([big, small], n_top=10, method="highly_variable")
    assert st.pp.select_genes([small, big], n_top=10, method="highly_variable") == genes  # order of sections is moot
    assert st.pp.select_genes({"b": small, "a": big}, n_top=10, method="highly_variable") == genes
    # each section's variances are scanpy's for that section alone (clip sqrt(12) for the small one)
    per_section = [
        sc.experimental.pp.highly_variable_genes(t, flavor="pearson_residuals", n_top_genes=10, inplace=False)
        for t in (big, small)
    ]
    tops = [set(df.index[df["highly_variable"]]) for df in per_section]
    both = tops[0] & tops[1]
    assert both <= set(genes)  # genes in the top 10 of both sections come first
    assert set(genes) <= tops[0] | tops[1]


def test_highly_variable_without_units_is_refused():
    empty = table(np.zeros((0, 3)), ["a", "b", "c"])
    with pytest.raises(InputError, match="no units"):
        st.pp.select_genes(empty, n_top=1, method="highly_variable")
