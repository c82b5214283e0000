import numpy as np
import pytest
from scipy import sparse

from cellvi._validation import check_counts, check_no_empty_rows, row_sums


@pytest.mark.parametrize("to", [np.asarray, sparse.csr_matrix, sparse.csc_matrix])
def test_check_counts_accepts_integer_counts(to):
    X = to(np.array([[0, 1, 2], [3, 0, 5]], dtype=np.float32))
    check_counts(X, "adata.X")


@pytest.mark.parametrize("to", [np.asarray, sparse.csr_matrix])
@pytest.mark.parametrize(
    ("value", "match"),
    [(np.nan, "NaN"), (-1.0, "negative"), (0.5, "non-integer"), (np.inf, "infinite")],
)
def test_check_counts_names_argument_and_row(to, value, match):
    X = np.ones((20, 4), dtype=np.float32)
    X[13, 2] = value
    before = X.copy()
    with pytest.raises(ValueError, match=rf"adata.layers\['counts'\].*{match}.*row 13"):
        check_counts(to(X), "adata.layers['counts']", chunk_rows=4)
    np.testing.assert_array_equal(X, before)  # untouched


def test_check_counts_float_allowed_when_not_integer():
    check_counts(np.array([[0.5, 1.2]]), "x", integer=False)


def test_empty_rows_named():
    X = sparse.csr_matrix(np.array([[1, 0], [0, 0], [2, 2]]))
    with pytest.raises(ValueError, match="1 cell.*c1"):
        check_no_empty_rows(X, "adata.X", names=["c0", "c1", "c2"])
    np.testing.assert_array_equal(row_sums(X), [1, 0, 4])
