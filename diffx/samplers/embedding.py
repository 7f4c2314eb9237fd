"""A fitted solver with more network calls that computes exactly what a fitted solver with fewer does.

A ``LinearSolver`` of m calls (``diffx.samplers.learned``) is embedded into n > m calls by inserting
n - m extra calls, each at the midpoint (in t) of the widest remaining gap between call times (the last
gap running to t = 0). An extra call at t between calls at t_p > t > t_q queries the model at the
DDIM (first-order) step from the previous call's point,

    x = (sigma_t / sigma_p) x_p + (alpha_t - alpha_p sigma_t / sigma_p) x0_p,

a linear combination of the earlier features, so still a row of C; and no later row reads its output
(a zero column). The original rows are renumbered onto the new columns. So the embedded solver's output
equals the m-call solver's on any model. Calibration over ``steps=[5, 10, 20]`` scores the smaller budget's
result this way in the larger budget's calls and keeps it where it beats that budget's own result, so the
results are never worse on the validation noises as the budget grows (monotone in NFE by construction;
``diffx.samplers.calibration``).
"""

from __future__ import annotations

import torch

from diffx.errors import DiffxError
from diffx.samplers.learned import LinearSolver


def embed(solver: LinearSolver, n: int, schedule) -> LinearSolver:
    """``solver`` (m calls) as an ``n``-call ``LinearSolver`` with the same output (module docstring)."""
    m = solver.steps
    if n < m:
        raise DiffxError(f"cannot embed a {m}-call solver into {n} calls: expected n >= {m}")
    ts = solver.ts.double().tolist()
    calls: list[tuple[float, int | None]] = [(t, k) for k, t in enumerate(ts)]  # (time, original call or None)
    while len(calls) < n:
        ends = [t for t, _ in calls[1:]] + [0.0]
        widest = max(range(len(calls)), key=lambda i: calls[i][0] - ends[i])
        calls.insert(widest + 1, (0.5 * (calls[widest][0] + ends[widest]), None))
    column = {}  # original call k -> its feature's column in the new C (column 0 is the noise z)
    C0 = solver.C.double()
    C = torch.zeros(n + 1, n + 1, dtype=torch.float64)

    def renumber(row: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(n + 1, dtype=torch.float64)
        out[0] = row[0]
        for k, col in column.items():
            out[col] = row[k + 1]
        return out

    for i, (t, k) in enumerate(calls):
        if k is not None:
            C[i] = renumber(C0[k])
            column[k] = i + 1
        else:  # DDIM from the previous call's point x_{i-1}, whose x0 is column i
            (a_p, s_p), (a, s) = schedule.table(torch.tensor([calls[i - 1][0], t], dtype=torch.float64))
            C[i] = (s / s_p) * C[i - 1]
            C[i, i] += a - a_p * s / s_p
    C[n] = renumber(C0[m])
    meta = {**solver.meta, "embedded_from": m}
    return LinearSolver(torch.tensor([t for t, _ in calls], dtype=torch.float64), C, meta)
