"""The worst relative error of each diffusion function against the float64 oracle.

Run from the repository root: `.venv/bin/python benchmarks/oracle_errors.py`. It reuses
tests/test_diffusion.py's inputs and error measure (max|a - b| / max|b|) and
tests/oracle.py, and prints the worst value over 4 seeds, every mean x variance type and
clipping on and off: the figures quoted for the diffusion core. The tests assert bounds on
the same comparisons; this prints the values themselves.
"""

import itertools
import pathlib
import sys

import jax.numpy as jnp
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from oracle import Oracle  # noqa: E402
from test_diffusion import BETAS, ORACLE, SHAPE, T, _model_output, f32, rel_err  # noqa: E402

from ddpm import diffusion as D  # noqa: E402


def main():
    worst = {}

    def record(name, got, want):
        worst[name] = max(worst.get(name, 0.0), rel_err(got, want))

    d = D.create_diffusion(BETAS)
    for seed in range(4):
        rng = np.random.default_rng(seed)
        x0, noise = rng.uniform(-1, 1, SHAPE), rng.standard_normal(SHAPE)
        t = np.concatenate([[0, T - 1, 1], rng.integers(0, T, SHAPE[0] - 3)])
        xt = ORACLE.q_sample(x0, t, noise)
        jx0, jnoise, jt, jxt = f32(x0, noise, t, xt)
        record("q_sample", D.q_sample(d, jx0, jt, jnoise), xt)
        for i, (got, want) in enumerate(
            zip(D.q_mean_variance(d, jx0, jt), ORACLE.q_mean_variance(x0, t), strict=True)
        ):
            record(f"q_mean_variance[{i}]", jnp.broadcast_to(got, SHAPE), want)
        posterior = zip(
            D.q_posterior_mean_variance(d, jx0, jxt, jt), ORACLE.q_posterior(x0, xt, t), strict=True
        )
        for i, (got, want) in enumerate(posterior):
            record(f"q_posterior_mean_variance[{i}]", jnp.broadcast_to(got, SHAPE), want)
        record(
            "predict_xstart_from_eps",
            D.predict_xstart_from_eps(d, jxt, jt, jnoise),
            ORACLE.x0_from_eps(xt, t, noise),
        )
        record(
            "predict_eps_from_xstart",
            D.predict_eps_from_xstart(d, jxt, jt, jx0),
            ORACLE.eps_from_x0(xt, t, x0),
        )
        v = ORACLE.v(x0, t, noise)
        record("v_target", D.v_target(d, jx0, jt, jnoise), v)
        record("predict_xstart_from_v", D.predict_xstart_from_v(d, jxt, jt, jnp.float32(v)), x0)
        x_prev = ORACLE.q_posterior(x0, xt, t)[0]
        record(
            "predict_xstart_from_xprev",
            D.predict_xstart_from_xprev(d, jxt, jt, jnp.float32(x_prev)),
            x0,
        )
        for mean_type, var_type in itertools.product(D.MEAN_TYPES, D.VAR_TYPES):
            out = _model_output(np.random.default_rng(seed + 10), var_type)
            loss_type = "mse" if var_type.startswith("fixed") else "hybrid"
            dd = D.create_diffusion(
                BETAS, mean_type=mean_type, var_type=var_type, loss_type=loss_type
            )
            for clip in (True, False):
                got = D.p_mean_variance(dd, *f32(out, xt, t), clip_denoised=clip)
                want = ORACLE.p_mean_variance(out, xt, t, mean_type, var_type, clip)
                names = ["mean", "variance", "log_variance", "pred_xstart"]
                for name, g, w in zip(names, got, want, strict=True):
                    xprev = " (xprev)" if mean_type == "xprev" and name == "pred_xstart" else ""
                    record(f"p_mean_variance.{name}{xprev}", g, w)
                vb, _ = D.vb_terms_bpd(dd, *f32(out, x0, xt, t), clip_denoised=clip)
                vb_want, _ = ORACLE.vb_terms_bpd(out, x0, xt, t, mean_type, var_type, clip)
                record("vb_terms_bpd (t>0)", vb[t > 0], vb_want[t > 0])
        m1, m2 = rng.standard_normal((2, 1000))
        lv1, lv2 = rng.uniform(-10, 1, (2, 1000))
        record("normal_kl", D.normal_kl(*f32(m1, lv1, m2, lv2)), Oracle.normal_kl(m1, lv1, m2, lv2))
        x = rng.integers(0, 256, 2000) / 127.5 - 1
        mean, log_scales = (
            x + rng.normal(0, 0.02, 2000),
            rng.uniform(np.log(1e-3), np.log(0.5), 2000),
        )
        got = np.asarray(
            D.discretized_gaussian_log_likelihood(
                *f32(x), means=f32(mean)[0], log_scales=f32(log_scales)[0]
            )
        )
        want = Oracle.discretized_log_likelihood(x, mean, log_scales)
        resolved = want > np.log(1e-3)  # float32 cannot resolve the far tails
        record("discretized_gaussian_log_likelihood (p>=1e-3)", got[resolved], want[resolved])
        record("prior_bpd", D.prior_bpd(d, jnp.float32(x0)), ORACLE.prior_bpd(x0))
    for name, value in worst.items():
        print(f"{name:55s} {value:.2e}")


if __name__ == "__main__":
    main()
