"""Ground truth for linear-Gaussian state-space models: Kalman filter and RTS smoother.

Plain NumPy in float64, written from the textbook recursions (Särkkä, "Bayesian Filtering
and Smoothing", 2013, theorems 4.2 and 8.2), independently of ppl_ext.

Model: x_0 ~ N(m0, P0), x_t = A x_{t-1} + b_t + N(0, Q), y_t = H x_t + N(0, R).
"""

from __future__ import annotations

import math

import numpy as np


def lg_matrices(params: dict) -> dict:
    """The matrices of `models.ssm.linear_gaussian` (d-D) parameters, as float64 NumPy."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    return {"m0": p["initial_mean"], "P0": p["initial_cov"], "A": p["transition_matrix"],
            "Q": p["transition_cov"], "H": p["observation_matrix"], "R": p["observation_cov"]}


def lg1_matrices(params: dict) -> dict:
    """The matrices of `models.ssm.linear_gaussian_1d` parameters (1-D as 1x1)."""
    rho, sx, sy, s0 = (float(params[k]) for k in ("rho", "sigma_x", "sigma_y", "sigma_0"))
    return {"m0": np.zeros(1), "P0": np.array([[s0**2]]), "A": np.array([[rho]]),
            "Q": np.array([[sx**2]]), "H": np.array([[1.0]]), "R": np.array([[sy**2]])}


def _log_normal_density(y, mean, cov):
    diff = y - mean
    _, logdet = np.linalg.slogdet(cov)
    return -0.5 * (len(y) * math.log(2 * math.pi) + logdet + diff @ np.linalg.solve(cov, diff))


def kalman(matrices: dict, observations, offsets=None) -> dict:
    """Filter and smooth; returns float64 arrays.

    Keys: `filtered_means (T, d)`, `filtered_covs (T, d, d)`, `log_likelihoods (T,)`
    (cumulative `log p(y_{0:t})`), `smoothed_means`, `smoothed_covs`, `smoothed_cross`
    (`(T-1, d, d)`, `Cov(x_t, x_{t+1} | y_{0:T-1})`).
    """
    m0, P0, A, Q, H, R = (matrices[k] for k in ("m0", "P0", "A", "Q", "H", "R"))
    ys = np.asarray(observations, np.float64).reshape(len(observations), -1)
    num_times, d = len(ys), len(m0)
    offsets = np.zeros((num_times, d)) if offsets is None else np.asarray(
        offsets, np.float64).reshape(num_times, d)
    fm, fP = np.zeros((num_times, d)), np.zeros((num_times, d, d))
    pm, pP = np.zeros((num_times, d)), np.zeros((num_times, d, d))
    log_lik = np.zeros(num_times)
    total = 0.0
    for t in range(num_times):
        if t == 0:
            mean, cov = m0, P0
        else:
            mean, cov = A @ fm[t - 1] + offsets[t], A @ fP[t - 1] @ A.T + Q
        pm[t], pP[t] = mean, cov
        s = H @ cov @ H.T + R
        total += _log_normal_density(ys[t], H @ mean, s)
        log_lik[t] = total
        gain = cov @ H.T @ np.linalg.inv(s)
        fm[t] = mean + gain @ (ys[t] - H @ mean)
        fP[t] = cov - gain @ s @ gain.T
    sm, sP = fm.copy(), fP.copy()
    cross = np.zeros((max(num_times - 1, 0), d, d))
    for t in range(num_times - 2, -1, -1):
        gain = fP[t] @ A.T @ np.linalg.inv(pP[t + 1])
        sm[t] = fm[t] + gain @ (sm[t + 1] - pm[t + 1])
        sP[t] = fP[t] + gain @ (sP[t + 1] - pP[t + 1]) @ gain.T
        cross[t] = gain @ sP[t + 1]
    return {"filtered_means": fm, "filtered_covs": fP, "log_likelihoods": log_lik,
            "smoothed_means": sm, "smoothed_covs": sP, "smoothed_cross": cross}
