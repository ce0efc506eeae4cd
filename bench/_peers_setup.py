"""What ``bench/peers.py`` measures: the models, batch sizes, peers and sections, and each
peer's contenders (runners ``run(k)`` that do k steps): minigd, PyTorch eager, torch.func,
BackPACK, scikit-learn and the GEMM chains, plus the end-to-end training loops.
"""

from __future__ import annotations

import os
import time

from _common import THREAD_VARS

MODELS = ([64, 128, 128, 10], [784, 256, 256, 10])


BATCHES = (1, 2, 8, 32, 128, 512, 2048)


STATS_BATCHES = (8, 32, 128, 512)


GEMM_MIN_BATCH = 512


E2E_SIZES = [64, 64, 10]


E2E_LR = {1: 0.003, 8: 0.03, 32: 0.1, 256: 0.3}


E2E_TARGET = 0.95


PEERS = ("cpu", "numpy", "torch", "sklearn", "backpack")


SECTIONS = ("step", "gemm", "stats", "e2e")


def _name(sizes) -> str:
    return "-".join(map(str, sizes))


def step_flops(sizes, B: int) -> int:
    """FLOPs of the GEMMs in one training step (see the module docstring)."""
    layers = [a * b for a, b in zip(sizes[:-1], sizes[1:])]
    return 2 * B * (2 * sum(layers) + sum(layers[1:]))


def _import_peer(name: str, wanted):
    """(module or None, status string)."""
    if name not in wanted:
        return None, "not requested (--peers)"
    try:
        if name == "torch":
            import torch

            return torch, f"torch {torch.__version__}"
        if name == "sklearn":
            import sklearn
            from sklearn.neural_network import MLPClassifier  # noqa: F401

            return sklearn, f"scikit-learn {sklearn.__version__}"
        if name == "backpack":
            from importlib.metadata import version

            import backpack
            from backpack.extensions import BatchL2Grad, Variance  # noqa: F401

            try:
                v = version("backpack-for-pytorch")
            except Exception:  # pragma: no cover
                v = "?"
            return backpack, f"backpack-for-pytorch {v}"
    except Exception as e:  # ImportError, or a broken install
        return None, f"missing ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})"
    return None, "unknown peer"


def _pinned(torch) -> dict:
    """What each library reports as its thread count, in this process."""
    import numba

    out = {"env": {k: os.environ.get(k) for k in THREAD_VARS}, "numba": numba.get_num_threads()}
    try:
        import threadpoolctl

        out["threadpools"] = [
            {
                k: p.get(k)
                for k in ("internal_api", "version", "num_threads", "threading_layer", "architecture", "filepath")
            }
            for p in threadpoolctl.threadpool_info()
        ]
        for p in out["threadpools"]:
            p["filepath"] = os.path.basename(p["filepath"] or "")
    except Exception as e:  # pragma: no cover - informational
        out["threadpools"] = f"unavailable: {e}"
    if torch is not None:
        out["torch"] = torch.get_num_threads()
    return out


def _torch_info(torch) -> dict:
    """Version and build configuration of torch (read in a benchmark subprocess)."""
    return {
        "version": torch.__version__,
        "config": torch.__config__.show(),
        "parallel": torch.__config__.parallel_info(),
    }


def _torch_mlp(torch, m):
    """nn.Sequential with minigd model m's current weights."""
    nn = torch.nn
    layers = []
    L = len(m.weights)
    for l, (W, b) in enumerate(zip(m.weights, m.biases)):
        lin = nn.Linear(W.shape[0], W.shape[1])
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(W.T.copy()))
            lin.bias.copy_(torch.from_numpy(b.copy()))
        layers.append(lin)
        if l < L - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def _torch_step(torch, sizes, X, y, idx):
    """run(k): k PyTorch SGD steps (cross-entropy, lr 1e-3) of an MLP with minigd's initial
    weights on rows idx of (X, y) -- the peer step both peers.py and gemm_peak.py time."""
    import minigd as mg

    tm = _torch_mlp(torch, mg.MLP(sizes, seed=0))
    ce = torch.nn.CrossEntropyLoss()
    topt = torch.optim.SGD(tm.parameters(), lr=1e-3)
    Xt, yt, it = torch.from_numpy(X), torch.from_numpy(y), torch.from_numpy(idx)

    def run(k):
        for _ in range(k):
            xb, yb = Xt[it], yt[it]
            topt.zero_grad(set_to_none=True)
            loss = ce(tm(xb), yb)
            loss.backward()
            topt.step()

    return run


def _gemm_chain(np, sizes, B, rng):
    """run(k): k times the GEMMs of one step, on minigd's memory layout, preallocated, in numpy."""
    L = len(sizes) - 1
    acts = [rng.standard_normal((B, sizes[l])).astype(np.float32) for l in range(L)]
    Ws = [rng.standard_normal((sizes[l], sizes[l + 1])).astype(np.float32) for l in range(L)]
    zs = [np.empty((B, sizes[l + 1]), np.float32) for l in range(L)]
    ds = [rng.standard_normal((B, sizes[l + 1])).astype(np.float32) for l in range(L)]
    gWs = [np.empty_like(W) for W in Ws]
    dprev = [np.empty((B, sizes[l]), np.float32) for l in range(L)]

    def run(k):
        for _ in range(k):
            for l in range(L):
                np.matmul(acts[l], Ws[l], out=zs[l])
            for l in range(L - 1, -1, -1):
                np.matmul(acts[l].T, ds[l], out=gWs[l])
                if l > 0:
                    np.matmul(ds[l], Ws[l].T, out=dprev[l])

    return run


def _gemm_chain_torch(torch, sizes, B):
    """The same chain in torch.mm (MKL in the PyTorch wheels)."""
    L = len(sizes) - 1
    g = torch.Generator().manual_seed(0)
    acts = [torch.randn(B, sizes[l], generator=g) for l in range(L)]
    Ws = [torch.randn(sizes[l], sizes[l + 1], generator=g) for l in range(L)]
    zs = [torch.empty(B, sizes[l + 1]) for l in range(L)]
    ds = [torch.randn(B, sizes[l + 1], generator=g) for l in range(L)]
    gWs = [torch.empty_like(W) for W in Ws]
    dprev = [torch.empty(B, sizes[l]) for l in range(L)]

    def run(k):
        for _ in range(k):
            for l in range(L):
                torch.mm(acts[l], Ws[l], out=zs[l])
            for l in range(L - 1, -1, -1):
                torch.mm(acts[l].t(), ds[l], out=gWs[l])
                if l > 0:
                    torch.mm(ds[l], Ws[l].t(), out=dprev[l])

    return run


def _sklearn_runner(np, sizes, B, rng):
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    n_out = sizes[-1]
    clf = MLPClassifier(
        hidden_layer_sizes=tuple(sizes[1:-1]),
        activation="relu",
        solver="sgd",
        batch_size=B,
        learning_rate_init=1e-3,
        momentum=0.0,
        nesterovs_momentum=False,
        alpha=0.0,
        shuffle=False,
        random_state=0,
    )
    data = {"X": np.empty((0, sizes[0]), np.float32), "y": np.empty(0, np.int64)}

    def rows(k):
        need = k * B
        if len(data["X"]) < need:
            m = max(need, 2 * len(data["X"]), n_out)
            data["X"] = rng.standard_normal((m, sizes[0])).astype(np.float32)
            data["y"] = (np.arange(m) % n_out).astype(np.int64)  # every class present
        return data["X"][:need], data["y"][:need]

    Xi, yi = rows(max(1, -(-n_out // B)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.partial_fit(Xi, yi, classes=np.arange(n_out))

    def run(k):
        Xk, yk = rows(k)
        clf.partial_fit(Xk, yk)  # one epoch over k*B rows = k steps of batch B

    return run


def _minigd_stats(np, mg, sizes, X, y, idx, B) -> dict:
    m = mg.MLP(sizes, dtype="float32", backend="cpu", seed=0)
    Xc, yi, yf = m.check_Xy(X, y)
    impl = m.backend_impl
    impl.reserve(B)
    g = np.zeros(m.n_params, np.float32)
    mean, m2 = np.zeros(m.n_params), np.zeros(m.n_params)
    params = m.params
    Xb, yb = np.ascontiguousarray(X[idx]), y[idx]

    def plain(k):
        for _ in range(k):
            impl.loss_grad(params, g, Xc, yi, yf, idx, B)

    def norms(k):
        for _ in range(k):
            impl.loss_grad(params, g, Xc, yi, yf, idx, B, want_sqn=True)

    def moments(k):
        for _ in range(k):
            impl.moments_update(params, g, Xc, yi, yf, idx, B, 1000, mean, m2)

    def api_plain(k):
        for _ in range(k):
            m.loss_and_grad(Xb, yb)

    def api_norms(k):
        for _ in range(k):
            mg.per_example_grad_norms(m, Xb, yb)

    def api_moments(k):
        for _ in range(k):
            mg.grad_moments(m, Xb, yb, chunk_size=B)

    out = {"mg_plain": plain, "mg_norms": norms, "mg_moments": moments}
    if B >= 2:
        out.update({"mg_api_plain": api_plain, "mg_api_norms": api_norms, "mg_api_moments": api_moments})
    return out


def _torch_stats(torch, mg, sizes, X, y, idx, B, backpack) -> dict:
    import copy

    from torch.func import functional_call, grad, vmap

    F = torch.nn.functional
    tm = _torch_mlp(torch, mg.MLP(sizes, seed=0))
    ce = torch.nn.CrossEntropyLoss()
    Xt, yt, it = torch.from_numpy(X), torch.from_numpy(y), torch.from_numpy(idx)

    def plain(k):
        for _ in range(k):
            xb, yb = Xt[it], yt[it]
            tm.zero_grad(set_to_none=True)
            ce(tm(xb), yb).backward()

    params = {k: v.detach() for k, v in tm.named_parameters()}

    def loss_one(p, x, t):
        return F.cross_entropy(functional_call(tm, p, (x.unsqueeze(0),)), t.unsqueeze(0))

    per_sample = vmap(grad(loss_one), in_dims=(None, 0, 0))

    def tf_norms(k):
        for _ in range(k):
            g = per_sample(params, Xt[it], yt[it])
            torch.sqrt(sum(v.reshape(B, -1).square().sum(1) for v in g.values()))

    def tf_moments(k):
        # explicit two-pass mean / variance (ddof=1): 1.5-7x faster here than
        # torch.var_mean(dim=0), whose strided reduction over the batch dimension is slow
        for _ in range(k):
            g = per_sample(params, Xt[it], yt[it])
            for v in g.values():
                mean = v.mean(0)
                (v - mean).square_().sum(0).div_(B - 1)

    out = {"t_plain": plain, "tf_norms": tf_norms, "tf_moments": tf_moments}
    if backpack is not None:
        from backpack import backpack as bp_ctx
        from backpack import extend
        from backpack.extensions import BatchL2Grad, Variance

        bm = extend(copy.deepcopy(tm))
        bce = extend(torch.nn.CrossEntropyLoss())

        def bp_plain(k):
            for _ in range(k):
                bm.zero_grad(set_to_none=True)
                bce(bm(Xt[it]), yt[it]).backward()

        def bp_l2(k):
            for _ in range(k):
                bm.zero_grad(set_to_none=True)
                loss = bce(bm(Xt[it]), yt[it])
                with bp_ctx(BatchL2Grad()):
                    loss.backward()
                torch.sqrt(sum(p.batch_l2 for p in bm.parameters()))

        def bp_var(k):
            for _ in range(k):
                bm.zero_grad(set_to_none=True)
                loss = bce(bm(Xt[it]), yt[it])
                with bp_ctx(Variance()):
                    loss.backward()

        out.update({"bp_plain": bp_plain, "bp_l2": bp_l2, "bp_var": bp_var})
    return out


def _digits(np):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    X = (d.data / 16).astype(np.float32)
    y = d.target.astype(np.int64)
    return train_test_split(X, y, test_size=0.2, stratify=y, random_state=0)


def _e2e_minigd(mg, Xt, yt, Xv, yv, B, lr, every, seed, target, max_epochs) -> dict:
    m = mg.MLP(E2E_SIZES, seed=seed)
    ev = [0.0]
    evaluate = m.evaluate

    def timed_evaluate(X, y):
        t0 = time.perf_counter()
        r = evaluate(X, y)
        ev[0] += time.perf_counter() - t0
        return r

    m.evaluate = timed_evaluate  # fit calls model.evaluate: exclude its time
    t0 = time.perf_counter()
    h = mg.fit(
        m,
        Xt,
        yt,
        batch_size=B,
        epochs=max_epochs,
        optimizer=mg.SGD(lr=lr, momentum=0.9),
        validation=(Xv, yv),
        eval_every=every,
        target={"val_accuracy": target},
        seed=seed,
    )
    wall = time.perf_counter() - t0 - ev[0]
    return {
        "seed": seed,
        "reached": bool(h.reached),
        "steps": h.steps_to_target,
        "wall_s": wall,
        "step_time_s": h.time_to_target,
    }


def _e2e_torch(torch, np, mg, Xt, yt, Xv, yv, B, lr, every, seed, target, max_epochs) -> dict:
    tm = _torch_mlp(torch, mg.MLP(E2E_SIZES, seed=seed))  # minigd's He-uniform init
    ce = torch.nn.CrossEntropyLoss()
    t0 = time.perf_counter()
    opt = torch.optim.SGD(tm.parameters(), lr=lr, momentum=0.9)
    X_, y_ = torch.from_numpy(Xt), torch.from_numpy(yt)
    Xv_, yv_ = torch.from_numpy(Xv), torch.from_numpy(yv)
    n = len(Xt)
    rng = np.random.default_rng(seed)  # minigd's shuffle sampler, replayed
    order = np.arange(n, dtype=np.int64)
    per_epoch = -(-n // B)
    step, ev, reached = 0, 0.0, False
    for _ in range(max_epochs):
        rng.shuffle(order)
        src = torch.from_numpy(order)
        for k in range(per_epoch):
            idx = src[k * B : (k + 1) * B]
            xb, yb = X_[idx], y_[idx]
            opt.zero_grad(set_to_none=True)
            loss = ce(tm(xb), yb)
            loss.backward()
            opt.step()
            step += 1
            if step % every == 0:
                te = time.perf_counter()
                with torch.no_grad():
                    acc = (tm(Xv_).argmax(1) == yv_).float().mean().item()
                reached = acc >= target
                ev += time.perf_counter() - te
                if reached:
                    break
        if reached:
            break
    wall = time.perf_counter() - t0 - ev
    return {"seed": seed, "reached": reached, "steps": step if reached else None, "wall_s": wall}
