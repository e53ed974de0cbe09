"""Class-conditional digits with classifier-free guidance (t = 0 noise, t = 1 data).

Trains a conditional UNet on sklearn 8x8 digits with class dropout (p = 0.1, null label 10), samples with
CFG (w in {0, 1, 2, 4} and w = 2, 4 on a middle time interval) by fixed-step Heun PF-ODE, scores generated digits
with a logistic-regression classifier trained on the real training digits, and compares conditional (w = 1)
against unconditional (null label) test bits/dim. Oracle: exact conditional log-likelihoods of a 2-D mixture.

    python experiments/guidance.py --quick
Last stdout line: one JSON object.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

T0 = time.perf_counter()
WS = (0.0, 1.0, 2.0, 4.0)
INTERVALS = ((2.0, 0.2, 0.8), (4.0, 0.2, 0.8))


def log(*a):
    print("[guidance]", *a, file=sys.stderr, flush=True)


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--n-per-class", type=int, default=None)
    p.add_argument("--n-test", type=int, default=None)
    p.add_argument("--base", type=int, default=None)
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--workdir", default=os.path.join("runs", "guidance"))
    p.add_argument("--quick", action="store_true")
    a = p.parse_args(argv)
    for k, full, quick in (("steps", 3000, 400), ("batch_size", 64, 64), ("n_per_class", 50, 20),
                           ("n_test", 100, 10), ("base", 16, 8)):
        if getattr(a, k) is None:
            setattr(a, k, quick if a.quick else full)
    os.makedirs(a.workdir, exist_ok=True)

    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from sklearn.linear_model import LogisticRegression

    import diffjax as dj
    from diffjax_app.metrics import energy_distance

    path = dj.LinearPath()
    kind = "velocity"
    tr_k, tr_y = dj.data.load_digits_with_labels("train")
    te_k, te_y = dj.data.load_digits_with_labels("test")
    tr_k_np, tr_y_np = np.asarray(tr_k), np.asarray(tr_y)
    te_k_np, te_y_np = np.asarray(te_k), np.asarray(te_y)

    # --- training
    model = dj.nn.UNet(1, a.base, (1, 2), num_classes=10, rngs=nnx.Rngs(0))
    apply, params = dj.nn.split(model)
    data_key = jax.random.key(1)
    n_tr = tr_k.shape[0]

    def batch_fn(step):
        k = jax.random.fold_in(data_key, step)
        k1, k2 = jax.random.split(k)
        idx = jax.random.randint(k1, (a.batch_size,), 0, n_tr)
        return dj.data.digits_to_model_space(tr_k[idx], k2), tr_y[idx]

    config = dj.train.TrainConfig(total_steps=a.steps, batch_size=a.batch_size, learning_rate=2e-3,
                                  warmup_steps=min(100, a.steps // 10), ema_decay=0.995)
    tic = time.perf_counter()
    state, hist = dj.train.fit(
        apply, params, dj.flow_matching(path), batch_fn, config,
        loss_fn=functools.partial(dj.conditional_batch_loss, dropout=dj.ClassDropout(10, 0.1)),
        progress=False, steps_per_dispatch=10, log_every=max(10, a.steps // 10))
    train_s = time.perf_counter() - tic
    ema = state.ema_params
    log(f"trained {a.steps} steps in {train_s:.1f}s, final loss {hist['loss'][-1]:.4f}")

    # --- guided sampling: one program for all w (w is an array argument)
    def guidance_rule(w, lo, hi):
        return dj.TimeInterval(dj.CFG(w), lo, hi)

    @eqx.filter_jit
    def sample(params, keys, labels, w, lo, hi):
        def one(key, c):
            g = dj.CFGModel(eqx.Partial(apply, params), kind, path, cond=c, null=jnp.asarray(10, jnp.int32),
                            guidance=guidance_rule(w, lo, hi))
            return dj.sample_ode(dj.velocity_field(g, kind, path), path, key, shape=(8, 8, 1),
                                 num_steps=a.sample_steps).samples
        return jax.vmap(one)(keys, labels)

    clf = LogisticRegression(max_iter=5000).fit(tr_k_np.reshape(-1, 64), tr_y_np)
    clf_test = float(clf.score(te_k_np.reshape(-1, 64), te_y_np))
    log(f"classifier test accuracy {clf_test:.3f}")

    K = a.n_per_class
    labels = jnp.repeat(jnp.arange(10, dtype=jnp.int32), K)
    keys = jax.random.split(jax.random.key(2), labels.shape[0])
    lab_np = np.asarray(labels)

    def pdist_mean(x):
        d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
        n = len(x)
        return d.sum() / (n * (n - 1)) if n > 1 else float("nan")

    real_div = {c: pdist_mean(te_k_np.reshape(-1, 64)[te_y_np == c].astype(float)) for c in range(10)}
    train_flat = tr_k_np.reshape(-1, 64).astype(float)

    settings = [(f"{w:g}", w, 0.0, 1.0) for w in WS] + [(f"{w:g}@[{lo},{hi}]", w, lo, hi) for w, lo, hi in INTERVALS]
    results, grids = {}, {}
    tic = time.perf_counter()
    for name, w, lo, hi in settings:
        xs = sample(ema, keys, labels, jnp.float32(w), jnp.float32(lo), jnp.float32(hi))
        kd = np.asarray(dj.data.model_space_to_digits(xs)).reshape(-1, 64)
        acc = float((clf.predict(kd) == lab_np).mean())
        kf = kd.astype(float)
        div = float(np.mean([pdist_mean(kf[lab_np == c]) / real_div[c] for c in range(10)]))
        nn_d = float(np.mean(np.sqrt(((kf[:, None] - train_flat[None]) ** 2).sum(-1)).min(1)))
        ed = float(np.mean([float(energy_distance(jnp.asarray(kf[lab_np == c]),
                                                  jnp.asarray(te_k_np.reshape(-1, 64)[te_y_np == c].astype(float))))
                            for c in range(10)]))
        results[name] = {"accuracy": acc, "diversity_ratio": div, "nn_dist_to_train": nn_d, "energy_distance": ed}
        grids[name] = kd.reshape(10, K, 8, 8)
        log(name, results[name])
    sample_s = time.perf_counter() - tic

    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        ncol = min(K, 10)
        fig, axes = plt.subplots(1, len(grids), figsize=(3 * len(grids), 3.2))
        for ax, (name, g) in zip(axes, grids.items()):
            img = g[:, :ncol].transpose(0, 2, 1, 3).reshape(80, 8 * ncol)
            ax.imshow(img, cmap="gray_r", vmin=0, vmax=16)
            ax.set_title(f"w={name}")
            ax.axis("off")
        fig.savefig(os.path.join(a.workdir, "samples.png"), dpi=100, bbox_inches="tight")
        plt.close(fig)
    except Exception as e:  # noqa: BLE001
        log("figure not written:", e)

    # --- conditional vs unconditional bpd (same network; null label 10)
    n = a.n_test
    tk, ty = te_k[:n], te_y[:n]

    @eqx.filter_jit
    def bpd(params, ks, cs, key):
        def one(k, c, kk):
            m = dj.Conditioned(eqx.Partial(apply, params), c)
            return dj.bits_per_dim(dj.velocity_field(m, kind, path), path, k, key=kk, num_levels=17)
        return jax.vmap(one)(ks, cs, jax.random.split(key, ks.shape[0]))

    tic = time.perf_counter()
    bc = np.asarray(bpd(ema, tk, ty, jax.random.key(3)))
    bu = np.asarray(bpd(ema, tk, jnp.full_like(ty, 10), jax.random.key(3)))
    bpd_s = time.perf_counter() - tic
    log(f"bpd conditional {bc.mean():.4f} unconditional {bu.mean():.4f} ({bpd_s:.1f}s)")

    # --- oracle
    gm = dj.GaussianMixture(jnp.array([0.3, 0.3, 0.4]), jnp.array([[-3.0, 0.0], [3.0, 0.0], [0.0, 4.0]]),
                            jnp.array([0.5, 0.8, 0.3]))
    cm = gm.conditional_model("velocity", path)

    @jax.jit
    def oracle_err(key):
        errs = []
        for c in range(3):
            cond = gm.conditional(c)
            x = cond.sample(jax.random.fold_in(key, c), 64)
            ll = jax.vmap(lambda xi: dj.log_likelihood(
                dj.velocity_field(dj.Conditioned(cm, c), "velocity", path), path, xi))(x)
            errs.append(jnp.max(jnp.abs(ll - jax.vmap(cond.log_prob)(x))))
        return jnp.max(jnp.stack(errs))

    oracle = float(oracle_err(jax.random.key(4)))
    log(f"oracle max |logp error| {oracle:.2e}")

    summary = {
        "classifier_accuracy": {k: results[k]["accuracy"] for k in ("0", "1", "2", "4")},
        "classifier_test_accuracy": clf_test,
        "oracle_max_abs_logp_error": oracle,
        "results": results,
        "bpd_conditional": float(bc.mean()),
        "bpd_unconditional": float(bu.mean()),
        "bpd_difference": float(bu.mean() - bc.mean()),
        "bpd_difference_bound": math.log2(10) / 64,
        "n_test": n, "n_per_class": K, "steps": a.steps, "base": a.base,
        "sampler": f"Heun, {a.sample_steps} fixed steps",
        "final_loss": float(hist["loss"][-1]),
        "train_s": train_s, "sample_s": sample_s, "bpd_s": bpd_s,
        "seconds": time.perf_counter() - T0,
    }
    with open(os.path.join(a.workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()
