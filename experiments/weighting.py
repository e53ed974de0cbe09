"""Implied weightings w(λ) and λ-densities p(λ) of published objectives (Kingma & Gao 2023, Fig. / Table 1).

Every objective is computed from its preset in ``diffjax.losses`` with ``implied_weighting`` — nothing is typed in by
hand — and plotted on λ ∈ [−15, 15]: top, w(λ) normalised to unit area on the plotted range (log y axis); bottom, the
density p(λ) in which each objective samples log-SNR. Time convention: t = 0 noise, t = 1 data (λ increases in t).

    python experiments/weighting.py --out runs/weighting.png
    python experiments/weighting.py --quick        # a coarser λ grid (121 points)

The table of peaks, medians and low-SNR mass goes to stderr; stdout ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(
    0, os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
)  # run from a checkout

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import diffjax.losses as L  # noqa: E402
from diffjax.paths import CosinePath, EDMPath, LinearPath  # noqa: E402
from diffjax_app.plots import figure, save  # noqa: E402


def objectives():
    # EDM on a path wide enough to cover the plotted λ range (EDMPath() stops at λ ∈ [−8.76, 12.43]).
    return {
        "VDM loss (w = 1)": L.vdm(LinearPath()),
        "ε-MSE, cosine (DDPM/IDDPM)": L.ddpm(CosinePath()),
        "ε-MSE, CondOT": L.ddpm(LinearPath()),
        "v-MSE, cosine (= FM shape)": L.v_prediction(CosinePath()),
        "flow matching, CondOT": L.flow_matching(LinearPath()),
        "SD3: RF + logit-normal(0, 1)": L.sd3(),
        "EDM": L.edm(EDMPath(1e-4, 1e4)),
        "sigmoid (b = 2)": L.sigmoid(CosinePath(), 2.0),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/weighting.png")
    parser.add_argument("--quick", action="store_true", help="121 λ points instead of 601")
    args = parser.parse_args(argv)
    start = time.time()
    lam = np.linspace(-15.0, 15.0, 121 if args.quick else 601)
    dl = lam[1] - lam[0]
    fig, (ax_w, ax_p) = figure(2, 1, figsize=(12, 9), sharex=True)
    summary = {}
    for name, obj in objectives().items():
        iw = L.implied_weighting(obj)
        w, p = jax.jit(jax.vmap(lambda l, iw=iw: (iw.weight(l), iw.density(l))))(jnp.asarray(lam))
        w, p = np.asarray(w, dtype=float), np.asarray(p, dtype=float)
        w_norm = w / (np.sum(w) * dl)
        cum = np.cumsum(w_norm) * dl
        summary[name] = (
            lam[np.argmax(w)],
            lam[np.searchsorted(cum, 0.5)],
            cum[np.searchsorted(lam, 0.0)],
        )
        style = "--" if "cosine" in name and "ε" not in name else "-"
        ax_w.semilogy(lam, w_norm, style, label=name)
        ax_p.plot(lam, p, style, label=name)
    ax_w.set_ylim(1e-6, 2.0)
    ax_w.set_ylabel("w(λ) / ∫w dλ  (λ ∈ [−15, 15])")
    ax_w.set_title("Implied weightings of diffusion / flow-matching objectives (Kingma & Gao 2023)")
    ax_p.set_ylabel("p(λ): where λ is sampled")
    ax_p.set_xlabel("log-SNR λ  (noise ← → data)")
    fm_peak, fm_med, fm_low = summary["flow matching, CondOT"]
    sd3_peak, sd3_med, _ = summary["SD3: RF + logit-normal(0, 1)"]
    ax_w.annotate(
        f"FM: w = e^(−λ/2), no peak: grows without bound\nat low SNR ({fm_low:.2%} of the weight at λ < 0)",
        xy=(-12, 0.2),
        xytext=(-14, 3e-6),
        arrowprops=dict(arrowstyle="->"),
    )
    ax_w.axvline(sd3_peak, color="grey", lw=0.8, ls=":")
    ax_w.annotate(
        f"SD3 logit-normal: peak λ = {sd3_peak:.2f},\nmedian λ = {sd3_med:.2f} (t = 1/2 is λ = 0)",
        xy=(sd3_peak, 0.15),
        xytext=(3, 0.5),
        arrowprops=dict(arrowstyle="->"),
    )
    ax_w.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    save(fig, args.out)
    print(f"{'objective':34s} {'argmax w':>9s} {'median':>8s} {'mass λ<0':>9s}", file=sys.stderr)
    for name, (peak, med, low) in summary.items():
        print(f"{name:34s} {peak:9.2f} {med:8.2f} {low:9.2%}", file=sys.stderr)
    wall = time.time() - start
    print(f"wrote {args.out} in {wall:.1f}s", file=sys.stderr)
    result = {
        "figure": os.path.abspath(args.out),
        "num_lambda": len(lam),
        "objectives": {
            name: {"argmax_w": float(peak), "median": float(med), "mass_below_0": float(low)}
            for name, (peak, med, low) in summary.items()
        },
        "wall_s": wall,
    }
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
