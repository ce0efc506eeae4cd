"""minigd.data: every loader on small generated files, the split/standardize pipeline,
the synthetic sources' known parameters, and every malformed input."""

from __future__ import annotations

import gzip
import json
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

import minigd as mg
from minigd.data import DATASETS, Dataset, from_arrays, load_dataset, read_idx, teacher_forward

# ------------------------------------------------------------------------------------------
# file writers
# ------------------------------------------------------------------------------------------

IDX_CODES = {
    np.dtype(np.uint8): 0x08,
    np.dtype(np.int8): 0x09,
    np.dtype(np.int16): 0x0B,
    np.dtype(np.int32): 0x0C,
    np.dtype(np.float32): 0x0D,
    np.dtype(np.float64): 0x0E,
}


def idx_bytes(arr: np.ndarray) -> bytes:
    code = IDX_CODES[arr.dtype]
    head = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return head + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def write_idx(path: Path, arr: np.ndarray, gz: bool = False) -> Path:
    data = idx_bytes(arr)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def mnist_like(n=60, seed=0, k=3):
    rng = np.random.default_rng(seed)
    y = np.arange(n, dtype=np.uint8) % k
    X = rng.integers(0, 256, size=(n, 4, 5)).astype(np.uint8)
    X[:, 0, 0] = 0  # a constant pixel, as MNIST's borders
    return X, y


def write_csv(path: Path, X, y, header=None, label_first=False, fmt="{:g}"):
    lines = [",".join(header)] if header else []
    for xi, yi in zip(X, y):
        cells = [fmt.format(float(v)) for v in xi]
        lab = fmt.format(float(yi))
        lines.append(",".join([lab] + cells if label_first else cells + [lab]))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def blobs_xy():
    """90 x 3 features, 3 unbalanced classes with labels 2, 5, 7 (40 / 30 / 20 examples)."""
    rng = np.random.default_rng(0)
    y = np.repeat(np.array([2, 5, 7]), [40, 30, 20])
    X = rng.normal(size=(90, 3)) * [1.0, 10.0, 0.1] + [0.0, 5.0, -3.0] + y[:, None]
    perm = rng.permutation(90)
    return X[perm], y[perm]


# ------------------------------------------------------------------------------------------
# loaders
# ------------------------------------------------------------------------------------------


def test_npz_classification_remaps_labels(tmp_path, blobs_xy):
    X, y = blobs_xy
    p = tmp_path / "blobs.npz"
    np.savez(p, X=X, y=y)
    ds = load_dataset(p, seed=1)
    assert isinstance(ds, Dataset)
    assert ds.task == "classification" and ds.loss == "cross_entropy"
    assert ds.n_classes == 3 and ds.n_out == 3 and ds.n_in == 3
    assert ds.info["classes"] == [2, 5, 7]
    assert ds.X_train.dtype == np.float32 and ds.X_val.dtype == np.float32
    assert ds.y_train.dtype == np.int64 and ds.y_val.dtype == np.int64
    assert (ds.n_train, ds.n_val) == (72, 18)
    assert set(np.unique(ds.y_train)) == {0, 1, 2}
    assert ds.info["n"] == 90 and ds.info["n_features"] == 3 and ds.info["split"] == "stratified"
    assert ds.info["path"] == str(p.resolve()) and ds.name == "blobs.npz"
    # the mapping is the sorted order: raw label classes[k] <-> k
    raw = dict(zip(map(tuple, np.round(X, 6)), y))
    Xr = ds.X_train.astype(np.float64) * ds.info["scale"] + ds.info["mean"]
    for xi, yi in zip(Xr[:10], ds.y_train[:10]):
        match = [v for k, v in raw.items() if np.allclose(k, xi, atol=1e-4)]
        assert match == [ds.info["classes"][yi]]


def test_npz_provided_validation_and_regression(tmp_path):
    rng = np.random.default_rng(1)
    X, Xv = rng.normal(size=(30, 2, 2)), rng.normal(size=(7, 2, 2))  # 3-D: flattened
    y, yv = rng.normal(size=(30, 2)), rng.normal(size=(7, 2))
    p = tmp_path / "reg.npz"
    np.savez(p, X=X, y=y, X_val=Xv, y_val=yv)
    ds = load_dataset(p, dtype="float64", standardize=False)
    assert ds.task == "regression" and ds.loss == "mse" and ds.n_classes is None
    assert ds.n_in == 4 and ds.n_out == 2 and ds.info["split"] == "provided"
    assert ds.info["example_shape"] == [2, 2]
    np.testing.assert_array_equal(ds.X_train, X.reshape(30, 4))  # no split, no shuffle
    np.testing.assert_array_equal(ds.X_val, Xv.reshape(7, 4))
    assert ds.y_train.dtype == np.float64
    # n subsamples the training set only when validation is provided
    ds2 = load_dataset(p, n=10)
    assert (ds2.n_train, ds2.n_val) == (10, 7) and ds2.y_val.dtype == np.float32


def test_npz_task_override(tmp_path):
    X = np.arange(40.0).reshape(20, 2)
    p = tmp_path / "a.npz"
    np.savez(p, X=X, y=np.arange(20) % 4)
    ds = load_dataset(p, task="regression")
    assert ds.task == "regression" and ds.y_train.dtype == np.float32
    np.savez(p, X=X, y=(np.arange(20) % 4).astype(np.float64))
    assert load_dataset(p).task == "regression"
    ds = load_dataset(p, task="classification")
    assert ds.task == "classification" and ds.n_classes == 4


@pytest.mark.parametrize("header", [True, False])
def test_csv_with_and_without_header(tmp_path, blobs_xy, header):
    X, y = blobs_xy
    names = ["a", "b", "c", "label"] if header else None
    p = write_csv(tmp_path / "d.csv", X, y, header=names, fmt="{!r}")
    ds = load_dataset(p, standardize=False, dtype="float64", seed=3)
    assert ds.task == "classification" and ds.n_classes == 3 and ds.info["classes"] == [2, 5, 7]
    assert ds.info["header"] is header
    if header:
        assert ds.info["feature_names"] == ["a", "b", "c"] and ds.info["label_column"] == "label"
    # every returned row is a row of the file, with its label
    allrows = {tuple(r): lab for r, lab in zip(X, y)}
    for xi, yi in zip(ds.X_train, ds.y_train):
        assert allrows[tuple(xi)] == ds.info["classes"][yi]


def test_csv_label_column_and_regression(tmp_path, blobs_xy):
    X, y = blobs_xy
    p = write_csv(tmp_path / "first.csv", X, y, header=["label", "a", "b", "c"], label_first=True)
    by_name = load_dataset(p, label_column="label")
    by_index = load_dataset(p, label_column=0)
    np.testing.assert_array_equal(by_name.X_train, by_index.X_train)
    assert by_name.n_classes == 3
    # real-valued last column -> regression; integer-valued -> classification unless task= says
    q = write_csv(tmp_path / "reg.csv", X[:, :2], X[:, 2], fmt="{!r}")
    ds = load_dataset(q)
    assert ds.task == "regression" and ds.y_train.dtype == np.float32 and ds.y_train.shape == (72,)
    r = write_csv(tmp_path / "int.csv", X[:, :2], y.astype(float), fmt="{!r}")  # "2.0", "5.0"
    assert load_dataset(r).task == "classification"
    assert load_dataset(r, task="regression").task == "regression"


def test_csv_gz_tsv_comments_blank_lines(tmp_path):
    text = "# a comment\nx1\tx2\ty\n\n1\t2\t0\n3\t4\t1\n5\t6\t0\n7\t8\t1\n9\t10\t0\n"
    p = tmp_path / "t.tsv.gz"
    p.write_bytes(gzip.compress(text.encode()))
    ds = load_dataset(p, standardize=False, val_fraction=0.4)
    assert ds.n_in == 2 and ds.info["n"] == 5 and ds.info["feature_names"] == ["x1", "x2"]
    assert (ds.n_train, ds.n_val) == (3, 2)


def test_csv_fast_and_exact_parsers_agree(tmp_path, blobs_xy, monkeypatch):
    """Well-formed files go through numpy's C parser; the line-by-line parser (which gives
    the exact line and column of an error) must read them identically."""
    from minigd.data import files as D

    X, y = blobs_xy
    files = [
        write_csv(tmp_path / "h.csv", X, y, header=["a", "b", "c", "y"], fmt="{!r}"),
        write_csv(tmp_path / "n.csv", X, y, fmt="{!r}"),
    ]
    (tmp_path / "c.csv").write_text("# comment\n\nx,y\n 1.5 , 2\n-3e2,4\n5,6\n7,8\n9,10\n")
    files.append(tmp_path / "c.csv")
    fast = [load_dataset(f, dtype="float64") for f in files]
    monkeypatch.setattr(D, "_csv_fast", lambda *a, **k: None)
    slow = [load_dataset(f, dtype="float64") for f in files]
    for a, b in zip(fast, slow):
        assert arrays_equal(a, b)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_images_and_labels(tmp_path, gz):
    X, y = mnist_like()
    sfx = ".gz" if gz else ""
    ip = write_idx(tmp_path / f"train-images-idx3-ubyte{sfx}", X, gz)
    lp = write_idx(tmp_path / f"train-labels-idx1-ubyte{sfx}", y, gz)
    np.testing.assert_array_equal(read_idx(ip), X)
    np.testing.assert_array_equal(read_idx(lp), y)
    ds = load_dataset(ip, labels=lp, standardize=False, dtype="float64")
    assert ds.task == "classification" and ds.n_classes == 3 and ds.n_in == 20
    assert ds.info["image_shape"] == [4, 5] and ds.info["labels_path"] == str(lp.resolve())
    flat = {tuple(r): lab for r, lab in zip(X.reshape(60, -1).astype(float), y)}
    for xi, yi in zip(ds.X_val, ds.y_val):
        assert flat[tuple(xi)] == yi
    # the sibling labels file is found by its standard name; a directory works too
    for src in (dict(name_or_path=ip), dict(name_or_path=tmp_path)):
        other = load_dataset(**src, standardize=False, dtype="float64")
        np.testing.assert_array_equal(other.X_train, ds.X_train)
        np.testing.assert_array_equal(other.y_train, ds.y_train)
    # standardized: the constant pixel is centred, never divided by zero
    st = load_dataset(tmp_path)
    assert np.isfinite(st.X_train).all() and st.info["n_constant_features"] == 1
    assert np.all(st.X_train[:, 0] == 0) and st.info["scale"][0] == 1.0


def test_idx_directory_t10k_and_other_dtypes(tmp_path):
    X, y = mnist_like(n=20, seed=4)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", X)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", y)
    ds = load_dataset(tmp_path, part="t10k", standardize=False)
    assert ds.info["n"] == 20
    for arr in (
        np.arange(6, dtype=np.int16).reshape(2, 3) - 3,
        np.linspace(0, 1, 4).astype(np.float32),
        np.array([1.5, -2.0]),
        np.array([[-1, 2]], np.int32),
        np.array([-3, 4], np.int8),
    ):
        got = read_idx(write_idx(tmp_path / "a.idx", arr))
        assert got.dtype == arr.dtype and got.dtype.isnative
        np.testing.assert_array_equal(got, arr)


# ------------------------------------------------------------------------------------------
# the pipeline: determinism, stratification, standardization, subsampling
# ------------------------------------------------------------------------------------------


def arrays_equal(a: Dataset, b: Dataset) -> bool:
    return all(np.array_equal(getattr(a, k), getattr(b, k)) for k in ("X_train", "y_train", "X_val", "y_val"))


@pytest.mark.parametrize(
    "name,params",
    [
        ("teacher_student", {"n": 150, "n_classes": 3}),
        ("teacher_student", {"n": 150, "task": "regression", "n_out": 2}),
        ("linear_regression", {"n": 150}),
    ],
)
def test_determinism_under_seed(name, params):
    a = load_dataset(name, seed=7, **params)
    b = load_dataset(name, seed=7, **params)
    c = load_dataset(name, seed=8, **params)
    assert arrays_equal(a, b) and a.fingerprint() == b.fingerprint()
    assert not arrays_equal(a, c)
    # data_seed fixes the data while seed moves the split: same set of examples overall
    d1 = load_dataset(name, seed=1, data_seed=5, standardize=False, **params)
    d2 = load_dataset(name, seed=2, data_seed=5, standardize=False, **params)
    rows = lambda d: np.sort(np.concatenate([d.X_train, d.X_val])[:, 0])  # noqa: E731
    np.testing.assert_array_equal(rows(d1), rows(d2))
    assert not np.array_equal(d1.X_train, d2.X_train)


def test_determinism_files_and_digits(tmp_path, blobs_xy):
    p = tmp_path / "b.npz"
    np.savez(p, X=blobs_xy[0], y=blobs_xy[1])
    assert arrays_equal(load_dataset(p, seed=3, n=50), load_dataset(p, seed=3, n=50))
    assert not arrays_equal(load_dataset(p, seed=3), load_dataset(p, seed=4))


@pytest.mark.parametrize("val_fraction", [0.1, 0.2, 0.33, 0.5, 0.77])
@pytest.mark.parametrize("seed", [0, 1])
def test_split_is_stratified(blobs_xy, val_fraction, seed):
    X, y = blobs_xy
    y = y.copy()
    y[:3] = 9  # a tiny class of 3 examples too
    ds = from_arrays(X, y, val_fraction=val_fraction, seed=seed)
    counts = np.bincount(np.searchsorted([2, 5, 7, 9], y))
    n_val = int(np.floor(90 * val_fraction + 0.5))
    assert ds.n_val == n_val and ds.n_train == 90 - n_val
    val_counts = np.bincount(ds.y_val, minlength=4)
    assert np.all(np.abs(val_counts - counts * n_val / 90) < 1)  # within one example
    assert np.all(np.abs(val_counts - counts * val_fraction) <= 1)
    np.testing.assert_array_equal(val_counts + np.bincount(ds.y_train, minlength=4), counts)
    assert not np.all(np.diff(ds.y_train) >= 0)  # shuffled, not grouped


def test_subsample_is_stratified_and_bounded(blobs_xy):
    X, y = blobs_xy
    ds = from_arrays(X, y, n=45, seed=2)
    assert ds.info["n"] == 45 and ds.info["n_available"] == 90
    total = np.bincount(np.concatenate([ds.y_train, ds.y_val]), minlength=3)
    assert np.all(np.abs(total - np.array([40, 30, 20]) / 2) <= 1)
    with pytest.raises(ValueError, match=r"n: expected at most the 90 examples .* got 91"):
        from_arrays(X, y, n=91)


def test_standardization_uses_train_statistics_only(tmp_path):
    rng = np.random.default_rng(3)
    n = 50
    X = np.column_stack(
        [
            np.arange(n, dtype=float),  # a row id
            rng.normal(3.0, 5.0, n),
            np.full(n, 7.0),
        ]
    )  # and a constant column
    y = rng.integers(0, 2, n)
    p = tmp_path / "s.npz"
    np.savez(p, X=X, y=y)
    ds = load_dataset(p, dtype="float64", seed=5)
    mean, scale = ds.info["mean"], ds.info["scale"]
    raw_tr = ds.X_train * scale + mean
    raw_va = ds.X_val * scale + mean
    tr_ids, va_ids = np.rint(raw_tr[:, 0]).astype(int), np.rint(raw_va[:, 0]).astype(int)
    assert sorted(np.concatenate([tr_ids, va_ids])) == list(range(n))
    np.testing.assert_allclose(raw_tr, X[tr_ids], atol=1e-9)
    np.testing.assert_allclose(raw_va, X[va_ids], atol=1e-9)
    np.testing.assert_allclose(mean, X[tr_ids].mean(axis=0))
    np.testing.assert_allclose(scale[:2], X[tr_ids, :2].std(axis=0))
    assert scale[2] == 1.0 and ds.info["n_constant_features"] == 1
    np.testing.assert_allclose(ds.X_train[:, :2].mean(axis=0), 0, atol=1e-12)
    np.testing.assert_allclose(ds.X_train[:, :2].std(axis=0), 1, atol=1e-12)
    assert np.all(ds.X_train[:, 2] == 0)
    # changing only the validation rows changes nothing in the training split
    X2 = X.copy()
    X2[va_ids, 1:] += 1000.0
    np.savez(p, X=X2, y=y)
    ds2 = load_dataset(p, dtype="float64", seed=5)
    np.testing.assert_array_equal(ds2.X_train, ds.X_train)
    np.testing.assert_array_equal(ds2.info["mean"], mean)
    assert np.all(ds2.X_val[:, 1] > ds.X_val[:, 1] + 50)
    assert np.all(ds2.X_val[:, 2] == 1000.0)  # centred, not scaled


def test_no_standardize_keeps_raw_values_cast_to_dtype(blobs_xy):
    X, y = blobs_xy
    ds = from_arrays(X, y, standardize=False, dtype="float32")
    assert "mean" not in ds.info and ds.info["standardized"] is False
    rows = {tuple(np.float32(r)) for r in X}
    assert all(tuple(r) in rows for r in ds.X_train)


# ------------------------------------------------------------------------------------------
# synthetic sources
# ------------------------------------------------------------------------------------------


def test_teacher_student_classification_known_teacher():
    ds = load_dataset(
        "teacher_student", n=300, n_in=6, teacher_width=[8, 5], n_classes=4, activation="relu", dtype="float64", seed=2
    )
    assert (ds.n_train, ds.n_val, ds.n_in, ds.n_out) == (240, 60, 6, 4)
    assert ds.n_classes == 4 and ds.info["teacher_sizes"] == [6, 8, 5, 4]
    assert ds.info["noise_std"] == 0.0 and ds.info["classes"] == [0, 1, 2, 3]
    raw = ds.X_train * ds.info["scale"] + ds.info["mean"]
    logits = teacher_forward(raw, ds.info["teacher_weights"], ds.info["teacher_biases"], "relu")
    np.testing.assert_array_equal(np.argmax(logits, axis=1), ds.y_train)  # noise 0: exact labels
    # the teacher depends on the seed and the sizes, not on n
    big = load_dataset("teacher_student", n=500, n_in=6, teacher_width=[8, 5], n_classes=4, activation="relu", seed=2)
    for a, b in zip(big.info["teacher_weights"], ds.info["teacher_weights"]):
        np.testing.assert_array_equal(a, b)
    # label noise flips some argmaxes, not most
    noisy = load_dataset(
        "teacher_student",
        n=300,
        n_in=6,
        teacher_width=[8, 5],
        n_classes=4,
        activation="relu",
        dtype="float64",
        seed=2,
        noise=0.05,
    )
    raw = noisy.X_train * noisy.info["scale"] + noisy.info["mean"]
    clean = np.argmax(teacher_forward(raw, noisy.info["teacher_weights"], noisy.info["teacher_biases"], "relu"), axis=1)
    agree = np.mean(clean == noisy.y_train)
    assert 0.6 < agree < 1.0


def test_teacher_student_regression_noise_level():
    sigma = 0.3
    ds = load_dataset(
        "teacher_student", n=4000, task="regression", n_out=2, teacher_width=16, noise=sigma, dtype="float64", seed=0
    )
    assert ds.task == "regression" and ds.n_out == 2 and ds.y_train.shape == (3200, 2)
    raw = ds.X_train * ds.info["scale"] + ds.info["mean"]
    resid = ds.y_train - teacher_forward(raw, ds.info["teacher_weights"], ds.info["teacher_biases"], "tanh")
    # sample std of 6400 Gaussian residuals: relative error ~ 1/sqrt(2 * 6400) ~ 0.9 %
    assert abs(resid.std() / sigma - 1) < 0.05
    one = load_dataset("teacher_student", n=50, task="regression")
    assert one.y_train.shape == (40,) and one.n_out == 1 and one.y_train.dtype == np.float32


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_linear_regression_least_squares_recovers_w_star(dtype):
    n, d, sigma = 2000, 5, 0.2
    ds = load_dataset("linear_regression", n=n, n_in=d, noise=sigma, dtype=dtype, seed=11)
    info = ds.info
    assert info["w_star"].shape == (d,) and info["noise_std"] == sigma
    A = np.column_stack([ds.X_train.astype(np.float64), np.ones(ds.n_train)])
    coef, *_ = np.linalg.lstsq(A, ds.y_train.astype(np.float64), rcond=None)
    truth = np.append(info["w_star_effective"], info["b_star_effective"])
    # OLS: coef - truth ~ N(0, sigma^2 (A^T A)^-1); allow 5 standard errors (+ float32 rounding)
    se = sigma * np.sqrt(np.diag(np.linalg.inv(A.T @ A)))
    assert np.all(np.abs(coef - truth) < 5 * se + (1e-5 if dtype == "float32" else 0))
    # raw coordinates: undo the standardization and recover w*, b* themselves
    w_raw = coef[:d] / info["scale"]
    b_raw = coef[d] - info["mean"] @ w_raw
    assert np.all(np.abs(w_raw - info["w_star"]) < 5 * se[:d] / info["scale"] + 1e-4)
    assert abs(b_raw - info["b_star"]) < 6 * sigma / np.sqrt(ds.n_train) + 1e-4
    # residual variance estimates sigma^2 (relative error ~ sqrt(2 / (n - d - 1)) ~ 3.5 %)
    resid = ds.y_train - A @ coef
    assert abs(resid @ resid / (ds.n_train - d - 1) / sigma**2 - 1) < 0.2


def test_linear_regression_noise_free_is_exact():
    ds = load_dataset("linear_regression", n=40, n_in=3, noise=0.0, standardize=False, dtype="float64")
    np.testing.assert_allclose(ds.y_train, ds.X_train @ ds.info["w_star"] + ds.info["b_star"], rtol=1e-12)


def test_digits_and_registry():
    pytest.importorskip("sklearn")
    assert set(DATASETS) >= {"digits", "teacher_student", "linear_regression"}
    ds = load_dataset("digits", n=500, seed=0)
    assert ds.n_in == 64 and ds.n_classes == 10 and (ds.n_train, ds.n_val) == (400, 100)
    assert ds.info["n_available"] == 1797 and "scikit-learn" in ds.info["source"]
    full = load_dataset("digits")
    assert (full.n_train, full.n_val) == (1438, 359)


def test_digits_without_sklearn(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=r"pip install 'minigd\[sklearn\]'"):
        load_dataset("digits")


# ------------------------------------------------------------------------------------------
# the Dataset object
# ------------------------------------------------------------------------------------------


def test_dataset_helpers_and_model_fit():
    ds = load_dataset("teacher_student", n=120, n_in=4, n_classes=3, dtype="float64", seed=0)
    spec = ds.spec()
    s = json.dumps(spec)
    assert spec["n_in"] == 4 and spec["loss"] == "cross_entropy" and spec["fingerprint"] == ds.fingerprint()
    assert json.loads(s)["info"]["load_args"]["params"] == {"n_in": 4, "n_classes": 3}
    text = ds.describe()
    assert "teacher_student" in text and "3 classes" in text and "96 train / 24 validation" in text
    assert "Dataset(name='teacher_student'" in repr(ds)
    assert ds.sizes([7]) == [4, 7, 3] and ds.dtype == np.float64
    # the arrays go straight into the model: no conversion by the user
    model = mg.MLP(ds.sizes([5]), loss=ds.loss, dtype=ds.dtype, backend="numpy", seed=0)
    assert np.isfinite(model.loss(*ds.validation))
    reg = load_dataset("linear_regression", n=60, n_in=2)
    m2 = mg.MLP(reg.sizes(), loss=reg.loss, backend="numpy")
    assert np.isfinite(m2.loss(reg.X_train, reg.y_train))
    with pytest.raises(dataclasses_FrozenInstanceError):
        ds.name = "x"


dataclasses_FrozenInstanceError = __import__("dataclasses").FrozenInstanceError


def test_dataset_constructor_checks():
    X = np.zeros((4, 2), np.float32)
    y = np.array([0, 1, 0, 1])
    ok = Dataset(X, y, X[:2], y[:2], "classification", 2, "toy")
    assert ok.n_out == 2
    with pytest.raises(ValueError, match=r"task: expected one of \['classification', 'regression'\]"):
        Dataset(X, y, X, y, "ranking", 2, "toy")
    with pytest.raises(ValueError, match=r"y_train: expected class labels in \[0, 1\)"):
        Dataset(X, y, X, y, "classification", 1, "toy")
    with pytest.raises(TypeError, match=r"y_val: expected int64 class labels"):
        Dataset(X, y, X, y.astype(np.int32), "classification", 2, "toy")
    with pytest.raises(ValueError, match=r"X_val: expected 2 columns of dtype float32"):
        Dataset(X, y, X.astype(np.float64), y, "classification", 2, "toy")
    with pytest.raises(TypeError, match=r"y_train: expected regression targets of dtype float32"):
        Dataset(X, y.astype(np.float64), X, y.astype(np.float32), "regression", None, "toy")
    with pytest.raises(ValueError, match=r"n_classes: expected None for task 'regression'"):
        Dataset(X, y.astype(np.float32), X, y.astype(np.float32), "regression", 2, "toy")


# ------------------------------------------------------------------------------------------
# bad inputs
# ------------------------------------------------------------------------------------------


def test_unknown_names_and_extensions(tmp_path):
    with pytest.raises(
        ValueError,
        match=r"name_or_path: expected a data set name, one of "
        r"\['digits', 'linear_regression', 'teacher_student'\].*"
        r"got 'digitz'; did you mean 'digits'\?",
    ):
        load_dataset("digitz")
    with pytest.raises(FileNotFoundError, match=r"name_or_path: .* got '.*nope\.npz' \(no such file\)"):
        load_dataset(tmp_path / "nope.npz")
    with pytest.raises(FileNotFoundError, match=r"no such file"):
        load_dataset("missing/data.csv")
    p = tmp_path / "data.parquet"
    p.write_bytes(b"PAR1")
    with pytest.raises(
        ValueError,
        match=r"name_or_path: expected a file ending in \.npz, \.csv.*"
        r"got 'data\.parquet'",
    ):
        load_dataset(p)
    with pytest.raises(TypeError, match=r"name_or_path: expected a data set name \(str\) or a path.*got int"):
        load_dataset(3)
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(FileNotFoundError, match=r"standard IDX images file.*train-images-idx3-ubyte"):
        load_dataset(empty_dir)


def test_bad_common_arguments(blobs_xy):
    X, y = blobs_xy
    for vf in (0, 0.0, 1, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"val_fraction: expected a number [<>] [01]"):
            load_dataset("linear_regression", n=50, val_fraction=vf)
    with pytest.raises(TypeError, match=r"val_fraction: expected a real number, got str"):
        load_dataset("linear_regression", val_fraction="0.2")
    with pytest.raises(ValueError, match=r"dtype: expected 'float32' or 'float64', got str 'float16'"):
        load_dataset("linear_regression", dtype="float16")
    with pytest.raises(TypeError, match=r"seed: expected a non-negative int"):
        load_dataset("linear_regression", seed=-1)
    with pytest.raises(TypeError, match=r"standardize: expected True or False, got str"):
        load_dataset("linear_regression", standardize="yes")
    with pytest.raises(ValueError, match=r"n: expected an integer >= 1, got 0"):
        load_dataset("linear_regression", n=0)
    with pytest.raises(
        TypeError,
        match=r"params: expected keyword arguments among .*'noise'.* "
        r"got unknown \['n_clases'\]",
    ):
        load_dataset("linear_regression", n_clases=3)
    with pytest.raises(TypeError, match=r"params: .* for data set 'digits', got unknown \['labels'\]"):
        load_dataset("digits", labels="x")
    with pytest.raises(ValueError, match=r"activation: expected one of"):
        load_dataset("teacher_student", activation="swish")
    with pytest.raises(ValueError, match=r"n_classes: expected an integer >= 2, got 1"):
        load_dataset("teacher_student", n_classes=1)
    with pytest.raises(ValueError, match=r"noise: expected a number >= 0.0, got -1.0"):
        load_dataset("linear_regression", noise=-1.0)
    with pytest.raises(TypeError, match=r"teacher_width: expected an int or a list of ints"):
        load_dataset("teacher_student", teacher_width="wide")


def test_too_few_examples_for_split():
    X = np.zeros((2, 1))
    with pytest.raises(
        ValueError,
        match=r"n: expected enough examples for a train/validation split with "
        r"val_fraction=0.2 .* got 2 examples \(0 would go to validation\)",
    ):
        from_arrays(X, np.array([0, 1]))
    with pytest.raises(ValueError, match=r"got 2 examples \(2 would go to validation\)"):
        from_arrays(X, np.array([0, 1]), val_fraction=0.9)
    with pytest.raises(ValueError, match=r"got 1 examples"):
        load_dataset("linear_regression", n=1)
    ds = from_arrays(X, np.array([0, 1]), val_fraction=0.5)
    assert (ds.n_train, ds.n_val) == (1, 1)


def test_nan_inf_and_label_errors(tmp_path):
    X = np.random.default_rng(0).normal(size=(10, 2))
    y = np.arange(10) % 2
    bad = X.copy()
    bad[3, 1] = np.nan
    p = tmp_path / "nan.npz"
    np.savez(p, X=bad, y=y)
    with pytest.raises(
        ValueError,
        match=r"X: expected finite values, got 1 NaN/inf entries "
        r"\(the first at row 3, column 1: nan\)",
    ):
        load_dataset(p)
    np.savez(p, X=X, y=np.where(y == 1, np.inf, 0.5))
    with pytest.raises(ValueError, match=r"y: expected finite values, got NaN/inf in 5 rows"):
        load_dataset(p)
    q = tmp_path / "inf.csv"
    q.write_text("1,2,0\ninf,3,1\n" * 3)
    with pytest.raises(ValueError, match=r"X: expected finite values"):
        load_dataset(q)
    np.savez(p, X=X, y=X[:, 0])
    with pytest.raises(
        ValueError,
        match=r"y: expected integer-valued class labels for task "
        r"'classification', got non-integer values",
    ):
        load_dataset(p, task="classification")
    np.savez(p, X=X, y=np.array(list("ababababab")))
    with pytest.raises(TypeError, match=r"y: expected real numeric labels/targets, got array .* dtype <U1"):
        load_dataset(p)
    with pytest.raises(ValueError, match=r"task: expected one of"):
        load_dataset(q, task="ranking")


def test_npz_malformed(tmp_path):
    X = np.zeros((10, 2))
    p = tmp_path / "m.npz"
    np.savez(p, X=X)
    with pytest.raises(
        ValueError,
        match=r"expected arrays 'X' and 'y' in the \.npz, got \['X'\] "
        r"\(missing \['y'\]\)",
    ):
        load_dataset(p)
    np.savez(p, features=X, y=np.zeros(10))
    with pytest.raises(ValueError, match=r"missing \['X'\]"):
        load_dataset(p)
    np.savez(p, X=X, y=np.zeros(9, int))
    with pytest.raises(ValueError, match=r"y: expected 10 rows \(as X\).* got array of shape \(9,\)"):
        load_dataset(p)
    np.savez(p, X=X, y=np.zeros(10, int), X_val=X)
    with pytest.raises(ValueError, match=r"expected both 'X_val' and 'y_val' or neither, got only X_val"):
        load_dataset(p)
    np.savez(p, X=X, y=np.zeros(10, int), X_val=np.zeros((3, 5)), y_val=np.zeros(3, int))
    with pytest.raises(ValueError, match=r"X_val: expected 2 features \(as X\)"):
        load_dataset(p)
    np.savez(p, X=np.zeros(10), y=np.zeros(10, int))
    with pytest.raises(
        ValueError,
        match=r"X: expected a 2-D array \(n_examples, n_features\), "
        r"got array of shape \(10,\)",
    ):
        load_dataset(p)
    np.savez(p, X=X, y=np.array([None] * 10, dtype=object))
    with pytest.raises(ValueError, match=r"expected a \.npz of numeric arrays, got an entry that needs pickle"):
        load_dataset(p)
    p.write_bytes(b"this is not a zip archive")
    with pytest.raises(
        ValueError,
        match=r"name_or_path: expected a valid \.npz archive \(a zip file\), "
        r"got .* which starts with bytes 74 68 69 73",
    ):
        load_dataset(p)
    np.savez(p, X=X, y=np.zeros(10, int))
    p.write_bytes(p.read_bytes()[:60])  # a zip cut short
    with pytest.raises(
        ValueError,
        match=r"name_or_path: expected a valid \.npz archive, got .* "
        r"could not be read",
    ):
        load_dataset(p)


def test_csv_malformed(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text("a,b,y\n1,2,0\n3,x,1\n")
    with pytest.raises(ValueError, match=r"expected numeric entries, got 'x' on line 3, column 2"):
        load_dataset(p)
    p.write_text("1,x,0\n3,4,1\n")
    with pytest.raises(
        ValueError,
        match=r"header: could not tell whether line 1 of 'bad\.csv' is a header "
        r"\(it mixes numbers and text such as 'x'\)",
    ):
        load_dataset(p)
    with pytest.raises(ValueError, match=r"got 'x' on line 1, column 2"):
        load_dataset(p, header=False)
    p.write_text("1,2,0\n3,4\n5,6,1\n")
    with pytest.raises(
        ValueError,
        match=r"ragged rows: expected 3 fields per row \(as the first row\), "
        r"got 2 on line 2",
    ):
        load_dataset(p)
    p.write_text("a,b,y\n1,2,0\n3,4,5,1\n")
    with pytest.raises(ValueError, match=r"ragged rows: expected 3 fields .*as the header.* got 4 on line 3"):
        load_dataset(p)
    p.write_text("1,,0\n3,4,1\n")
    with pytest.raises(ValueError, match=r"got '' on line 1, column 2"):
        load_dataset(p, header=False)
    p.write_text("a,b,y\n1,2,0\n")
    with pytest.raises(ValueError, match=r"expected numeric entries, got 'a' on line 1"):
        load_dataset(p, header=False)
    p.write_text("# only a comment\n\n")
    with pytest.raises(ValueError, match=r"expected at least one data row"):
        load_dataset(p)
    p.write_text("1\n2\n3\n")
    with pytest.raises(ValueError, match=r"expected at least 2 columns"):
        load_dataset(p)
    p.write_text("a,b,y\n1,2,0\n3,4,1\n5,6,1\n7,8,0\n9,1,1\n")
    with pytest.raises(ValueError, match=r"label_column: expected one of the header's names"):
        load_dataset(p, label_column="label")
    with pytest.raises(ValueError, match=r"label_column: expected an index in \[-3, 3\) for 3 columns, got 3"):
        load_dataset(p, label_column=3)
    with pytest.raises(TypeError, match=r"label_column: expected an int index or a header name, got float"):
        load_dataset(p, label_column=1.0)
    p.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(ValueError, match=r"expected a UTF-8 text \.csv file"):
        load_dataset(p)


def test_idx_malformed(tmp_path):
    X, y = mnist_like(n=12)
    ip = tmp_path / "train-images-idx3-ubyte"
    lp = write_idx(tmp_path / "train-labels-idx1-ubyte", y)
    good = idx_bytes(X)
    ip.write_bytes(b"\x01\x02" + good[2:])
    with pytest.raises(
        ValueError, match=r"expected an IDX file starting with magic 0x00 0x00 .* got bytes 01 02 08 03"
    ):
        load_dataset(ip)
    ip.write_bytes(good[:2] + b"\x07" + good[3:])
    with pytest.raises(ValueError, match=r"expected an IDX type code in .* got 0x7 \(bad magic\)"):
        load_dataset(ip)
    ip.write_bytes(good[:-5])
    with pytest.raises(
        ValueError,
        match=r"truncated IDX data: expected 240 bytes for shape \(12, 4, 5\) "
        r"of uint8, got 235",
    ):
        load_dataset(ip)
    ip.write_bytes(gzip.compress(good[:10]))
    with pytest.raises(ValueError, match=r"truncated IDX header: expected 16 bytes for 3 dimensions, got 10"):
        load_dataset(ip)
    ip.write_bytes(good + b"\x00\x00")
    with pytest.raises(ValueError, match=r"expected exactly 240 bytes of IDX data .* \(2 trailing bytes\)"):
        load_dataset(ip)
    ip.write_bytes(gzip.compress(good)[:-12])
    with pytest.raises(ValueError, match=r"name_or_path: expected a valid gzip file, .* could not be decompressed"):
        load_dataset(ip)
    ip.write_bytes(b"")
    with pytest.raises(ValueError, match=r"got bytes \(empty file\)"):
        load_dataset(ip)
    write_idx(ip, X)
    write_idx(lp, y[:10])
    with pytest.raises(ValueError, match=r"y: expected 12 rows \(as X\)"):
        load_dataset(ip)
    with pytest.raises(ValueError, match=r"labels: expected a 1-dimensional IDX labels file, got shape \(12, 4, 5\)"):
        load_dataset(ip, labels=ip)
    with pytest.raises(ValueError, match=r"name_or_path: expected an IDX images file with >= 2 dimensions"):
        load_dataset(lp, labels=lp)
    with pytest.raises(FileNotFoundError, match=r"labels: expected an existing IDX labels file, got '.*nope'"):
        load_dataset(ip, labels=tmp_path / "nope")
    lone = write_idx(tmp_path / "other-images-idx3-ubyte.gz", X, gz=True)
    with pytest.raises(ValueError, match=r"labels: expected the path of the IDX labels file .* got None"):
        load_dataset(lone)
    with pytest.raises(TypeError, match=r"labels: expected a path .* got int"):
        load_dataset(ip, labels=3)
    with pytest.raises(FileNotFoundError, match=r"no such file"):
        read_idx(tmp_path / "absent-idx1-ubyte")
