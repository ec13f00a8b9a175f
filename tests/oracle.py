"""An independent float64 numpy oracle for the diffusion math, written from the paper.

Nothing here imports the library. Where the paper allows, the formulas take a
different road from the library's: the posterior q(x_{t-1} | x_t, x_0) is derived
from Bayes' rule as a product of two Gaussians (precision-weighted), not from the
closed-form coefficients of eq. 7, and alpha_bar is a running product in a loop.
Timesteps are 0-based (code index t is the paper's t+1).
"""

import math

import numpy as np


class Oracle:
    def __init__(self, betas):
        self.betas = np.asarray(betas, dtype=np.float64)
        alpha_bar, running = [], 1.0
        for beta in self.betas:
            running *= 1.0 - beta
            alpha_bar.append(running)
        self.alpha_bar = np.array(alpha_bar)
        self.alpha_bar_prev = np.array([1.0] + alpha_bar[:-1])
        self.T = len(self.betas)

    def at(self, table, t, x):
        """table[t] broadcast over the data dims of x (t [B], x [B, ...])."""
        t = np.asarray(t)
        return table[t].reshape(t.shape + (1,) * (np.ndim(x) - t.ndim))

    # Forward process, eq. 4.
    def q_sample(self, x0, t, eps):
        ab = self.at(self.alpha_bar, t, x0)
        return np.sqrt(ab) * x0 + np.sqrt(1 - ab) * eps

    def q_mean_variance(self, x0, t):
        ab = self.at(self.alpha_bar, t, x0)
        return np.sqrt(ab) * x0, (1 - ab) * np.ones_like(x0), np.log(1 - ab) * np.ones_like(x0)

    # Posterior by Bayes: q(x_{t-1}|x_0) = N(sqrt(ab_prev) x0, 1 - ab_prev) times the
    # likelihood q(x_t|x_{t-1}) = N(sqrt(alpha) x_{t-1}, beta) seen as a function of x_{t-1}.
    def posterior_variance(self, t):
        t = np.asarray(t)
        beta, ab_prev = self.betas[t], self.alpha_bar_prev[t]
        alpha = 1 - beta
        with np.errstate(divide="ignore"):
            prior_precision = 1.0 / (1.0 - ab_prev)  # inf at t=0: x_{-1} = x_0 is known.
        return 1.0 / (prior_precision + alpha / beta)

    def q_posterior(self, x0, xt, t):
        """(mean, variance, clipped log variance) of q(x_{t-1} | x_t, x_0)."""
        t = np.asarray(t)
        var = self.at(self.posterior_variance(np.arange(self.T)), t, x0)
        beta = self.at(self.betas, t, x0)
        ab_prev = self.at(self.alpha_bar_prev, t, x0)
        with np.errstate(divide="ignore", invalid="ignore"):
            mean = var * (np.sqrt(ab_prev) * x0 / (1 - ab_prev) + np.sqrt(1 - beta) * xt / beta)
        is_first = self.at(np.arange(self.T) == 0, t, x0)
        mean = np.where(is_first, x0 * np.ones_like(xt), mean)  # t=0: the posterior is x_0 itself.
        log_var_table = self.posterior_variance(np.arange(self.T))
        log_var_table[0] = log_var_table[1]  # beta-tilde_0 = 0: its log is clipped.
        log_var_table = np.log(log_var_table)
        return mean, var * np.ones_like(x0), self.at(log_var_table, t, x0) * np.ones_like(x0)

    # Targets.
    def x0_from_eps(self, xt, t, eps):
        ab = self.at(self.alpha_bar, t, xt)
        return (xt - np.sqrt(1 - ab) * eps) / np.sqrt(ab)

    def eps_from_x0(self, xt, t, x0):
        ab = self.at(self.alpha_bar, t, xt)
        return (xt - np.sqrt(ab) * x0) / np.sqrt(1 - ab)

    def v(self, x0, t, eps):
        ab = self.at(self.alpha_bar, t, x0)
        return np.sqrt(ab) * eps - np.sqrt(1 - ab) * x0

    def x0_from_v(self, xt, t, v):
        # Solve x_t = sqrt(ab) x0 + sqrt(1-ab) eps, v = sqrt(ab) eps - sqrt(1-ab) x0 for x0.
        ab = self.at(self.alpha_bar, t, xt)
        return np.sqrt(ab) * xt - np.sqrt(1 - ab) * v

    def x0_from_xprev(self, xt, t, xprev):
        # The posterior mean is linear in x0: mean(x0) = mean(0) + (mean(1) - mean(0)) x0.
        m0 = self.q_posterior(np.zeros_like(xt), xt, t)[0]
        m1 = self.q_posterior(np.ones_like(xt), xt, t)[0]
        return (xprev - m0) / (m1 - m0)

    def p_mean_variance(self, out, xt, t, mean_type, var_type, clip):
        if var_type in ("learned", "learned_range"):
            out, var_out = np.split(out, 2, axis=-1)
            if var_type == "learned":
                log_var = var_out
            else:
                lo = self.q_posterior(xt, xt, t)[2]
                hi = np.log(self.at(self.betas, t, xt))
                log_var = lo + (var_out + 1) / 2 * (hi - lo)
        elif var_type == "fixedsmall":
            _, _, log_var = self.q_posterior(xt, xt, t)
        else:  # fixedlarge: beta_t, with log-variance index 0 replaced by log beta-tilde_1.
            table = np.log(self.betas.copy())
            table[0] = math.log(self.posterior_variance(1))
            log_var = self.at(table, t, xt) * np.ones_like(xt)
        if var_type == "fixedlarge":
            var = self.at(self.betas, t, xt) * np.ones_like(xt)
        elif var_type == "fixedsmall":
            var = self.q_posterior(xt, xt, t)[1]
        else:
            var = np.exp(log_var)
        x0 = {
            "eps": lambda: self.x0_from_eps(xt, t, out),
            "xstart": lambda: out,
            "v": lambda: self.x0_from_v(xt, t, out),
            "xprev": lambda: self.x0_from_xprev(xt, t, out),
        }[mean_type]()
        if clip:
            x0 = np.clip(x0, -1, 1)
        mean = out if mean_type == "xprev" else self.q_posterior(x0, xt, t)[0]
        return mean, var, log_var, x0

    # Likelihood terms.
    @staticmethod
    def normal_kl(m1, lv1, m2, lv2):
        s1, s2 = np.exp(0.5 * lv1), np.exp(0.5 * lv2)
        return np.log(s2 / s1) + (s1**2 + (m1 - m2) ** 2) / (2 * s2**2) - 0.5

    @staticmethod
    def discretized_log_likelihood(x, mean, log_scale):
        def cdf(u):  # tanh approximation of Phi, as in the official code.
            return 0.5 * (1 + np.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u**3)))

        scale = np.exp(log_scale)
        upper = cdf((x - mean + 1 / 255) / scale)
        lower = cdf((x - mean - 1 / 255) / scale)
        prob = np.where(x < -0.999, upper, np.where(x > 0.999, 1 - lower, upper - lower))
        return np.log(np.maximum(prob, 1e-12))

    @staticmethod
    def mean_over_data(x):
        return x.reshape(x.shape[0], -1).mean(axis=1)

    def vb_terms_bpd(self, out, x0, xt, t, mean_type, var_type, clip):
        true_mean, _, true_lv = self.q_posterior(x0, xt, t)
        mean, _, lv, x0_pred = self.p_mean_variance(out, xt, t, mean_type, var_type, clip)
        kl = self.mean_over_data(self.normal_kl(true_mean, true_lv, mean, lv))
        nll = -self.mean_over_data(self.discretized_log_likelihood(x0, mean, 0.5 * lv))
        return np.where(np.asarray(t) == 0, nll, kl) / math.log(2), x0_pred

    def prior_bpd(self, x0):
        t = np.full(x0.shape[0], self.T - 1)
        mean, _, lv = self.q_mean_variance(x0, t)
        return self.mean_over_data(self.normal_kl(mean, lv, 0.0, 0.0)) / math.log(2)
