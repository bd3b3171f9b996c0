"""Many scipy L-BFGS-B runs stepped together by one thread, sharing their products with the data.

Why: a logistic-regression grid solves 14 problems per fold on the same factor F (see ``logreg_space``).
Run one by one through ``scipy.optimize.minimize`` each would read F twice per evaluation on its own;
stepped together through scipy's reverse-communication ``setulb`` (``_Lbfgsb``) every round reads F once
for all of them (``_Evaluator``), and each run's iterates, iteration count and stop stay those that
scikit-learn's own ``minimize`` call would give (see ``featcache.heads.logreg`` for the whole method).
"""
from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from featcache.heads.base import sample_weights

if TYPE_CHECKING:
    from featcache.heads.logreg_space import Space


class _Lbfgsb:
    """One scipy L-BFGS-B run stepped from outside: scipy's own ``setulb`` inside ``minimize``'s loop.

    Why not ``scipy.optimize.minimize``: it owns the loop and calls the objective itself, so solving many
    problems with shared products needed one thread per problem, meeting at a barrier -- a thread hand-off
    and GIL traffic for every evaluation of every problem. ``setulb`` is reverse communication: it returns
    whenever it wants f and g at ``x``. So one thread steps all runs and evaluates them together.
    ``advance`` is the loop of ``scipy.optimize._lbfgsb_py._minimize_lbfgsb`` without bounds (maxcor 10,
    maxfun 15,000, factr = ftol / eps, the callback and max_iter tests in its order; an x equal to the
    last evaluated one reuses f and g, as its ``ScalarFunction`` does), so the iterates, iteration counts
    and stops are those scikit-learn gets through ``minimize``.
    """

    def __init__(self, n: int, *, maxiter: int, gtol: float, ftol: float, maxls: int = 50,
                 maxcor: int = 10, maxfun: int = 15000):
        from scipy.optimize import _lbfgsb

        m = maxcor
        self._setulb = _lbfgsb.setulb
        self.m, self.maxls, self.maxiter, self.maxfun = m, maxls, maxiter, maxfun
        self.factr, self.pgtol = ftol / np.finfo(float).eps, gtol
        self.x = np.zeros(n)
        self.f: Any = np.array(0.0)
        self.g = np.zeros(n)
        self.low, self.up, self.nbd = np.zeros(n), np.zeros(n), np.zeros(n, np.int32)
        self.wa = np.zeros(2 * m * n + 5 * n + 11 * m * m + 8 * m)
        self.iwa = np.zeros(3 * n, np.int32)
        self.task, self.ln_task = np.zeros(2, np.int32), np.zeros(2, np.int32)
        self.lsave, self.isave, self.dsave = np.zeros(4, np.int32), np.zeros(44, np.int32), np.zeros(29)
        self.nit = 0
        self.nfev = 0
        self._seen: tuple[np.ndarray, float, np.ndarray] | None = None  # last evaluated (x, f, g)

    def tell(self, x: np.ndarray, f: float, g: np.ndarray) -> None:
        """f and g at ``x`` (a copy of the ``x`` the run asked about)."""
        self.f, self.g = f, g
        self.nfev += 1
        self._seen = (x, f, g)

    def advance(self, accept) -> bool:
        """Step until the run wants f and g at ``self.x`` (True) or has ended (False).

        ``accept(x)`` is called at every accepted iterate (``minimize``'s callback); True stops the run there.
        """
        while True:
            self.g = self.g.astype(np.float64)  # minimize hands setulb a fresh copy every time
            self._setulb(self.m, self.x, self.low, self.up, self.nbd, self.f, self.g, self.factr,
                         self.pgtol, self.wa, self.iwa, self.task, self.lsave, self.isave, self.dsave,
                         self.maxls, self.ln_task)
            if self.task[0] == 3:  # wants f, g at x
                if self._seen is None or not np.array_equal(self.x, self._seen[0]):
                    return True
                self.f, self.g = self._seen[1], self._seen[2]
            elif self.task[0] == 1:  # a new iterate
                self.nit += 1
                if accept(self.x):
                    self.task[:] = (5, 505)
                if self.nit >= self.maxiter:
                    self.task[:] = (5, 504)
                elif self.nfev > self.maxfun:
                    self.task[:] = (5, 502)
            else:
                return False

    def outcome(self) -> tuple[int, str]:
        """scipy's ``status`` and ``message`` for this run as ``minimize`` would report them.

        0: converged (scipy's own tests, or ``accept`` -- our stand-in for scipy's gtol test -- stopped
        it); 1: max_iter or maxfun reached (scikit-learn warns, even when the last iterate would have
        passed: scipy announces a new iterate, and stops at max_iter, before testing it); 2: anything
        else (e.g. the line search failed; scikit-learn warns too).
        """
        from scipy.optimize._lbfgsb_py import status_messages, task_messages

        if self.task[0] == 4 or (self.task[0] == 5 and self.task[1] == 505):
            return 0, _CONVERGED
        status = 1 if self.nfev > self.maxfun or self.nit >= self.maxiter else 2
        return status, f"{status_messages[int(self.task[0])]}: {task_messages[int(self.task[1])]}"


#: scipy's message for a run stopped by its gradient test (the test ``accept`` applies in kernel space)
_CONVERGED = "CONVERGENCE: NORM OF PROJECTED GRADIENT <= PGTOL"
#: scipy's message for a run stopped at max_iter
_MAX_ITER = "STOP: TOTAL NO. OF ITERATIONS REACHED LIMIT"


class Solution(NamedTuple):
    """One problem's result: coefficients in the space (G [r, k]), intercept [k], scikit-learn's
    ``n_iter_`` and scipy's ``status``/``message`` (status != 0: scikit-learn warns: not converged)."""

    G: np.ndarray
    b: np.ndarray
    n_iter: int
    status: int
    message: str


class _Evaluator:
    """Objectives of k L-BFGS runs evaluated together, and scikit-learn's stop test applied to them.

    Why together: every run needs ``F @ G`` and ``F.T @ R`` per evaluation. One product with F for all of
    them, and the loss and gradient arithmetic as one vectorised pass, cost little more than one run's.
    Each run's numbers are those it would get alone.

    scikit-learn's stop test (kernel space only): max|D-space gradient| <= tol at the starting point (as
    scipy tests x0 before any step: a pass ends the run at iteration 0) and at every accepted iterate.
    Cheap bounds decide it on most iterations. When they cannot, the exact test needs a pass over all
    of Z -- memory-bound, 45-150 ms whether it is for one gradient or forty. So undecided iterates are
    queued and the run goes on; every few rounds (``_due``) every queued iterate is tested in one shared
    pass, and a run whose earliest converged iterate is found is stopped and returns *that* iterate and
    iteration count. Runs that end anyway (max_iter, f stalled, or the bounds' own stop) leave their
    queued iterates for one last pass (``resolve``). L-BFGS never looks ahead, so every result is the one
    an immediate test would have given; the price is a few extra rounds for a run that converged unseen.
    """

    CHECK_AGE = 8

    def __init__(self, space: Space, y: np.ndarray, n_cls: int, problems: list[dict], n_features: int):
        self.space, self.y = space, y
        self.k = 1 if n_cls == 2 else n_cls
        self.r = space.r
        self.onehot = None if self.k == 1 else np.eye(self.k)[y]
        self.n_features = n_features
        self.specs = []
        for p in problems:
            sw = sample_weights(y, p["class_weight"], n_cls)
            sw = np.ones(len(y)) if sw is None else sw
            sw_sum = float(sw.sum())
            self.specs.append({"swn": sw / sw_sum, "l2": 1.0 / (float(p["C"]) * sw_sum),
                               "intercept": bool(p["fit_intercept"]), "tol": float(p["tol"])})
        # per problem: the last evaluated point, its stop-test verdict (gmax, or None: undecided), gG,
        # max|gb| and ||gG||_2
        self.state: dict[int, tuple[np.ndarray, float | None, np.ndarray, float, float]] = {}
        self.iters = [0] * len(problems)
        # queued undecided iterates: (i, iteration, x, gG, max|gb|, ||gG||_2)
        self.queue: list[tuple[int, int, np.ndarray, np.ndarray, float, float]] = []
        self.queued_at = 0
        self.rho = 0.0  # largest max|g| / ||g||_2 seen in exact tests (predicts when to test)
        self.running = set(range(len(problems)))
        self.rounds = 0
        self.exact_checks = 0
        self.final: dict[int, tuple[np.ndarray, int]] = {}

    def n_params(self, i: int) -> int:
        return self.r * self.k + (self.k if self.specs[i]["intercept"] else 0)

    def ended(self, i: int) -> None:
        """Problem i's run is over (its queued iterates, if any, wait for ``resolve``)."""
        self.running.discard(i)

    def accepted(self, i: int, x: np.ndarray) -> bool:
        """scikit-learn's stop test at problem i's accepted iterate ``x``: True means stop here.

        A run stopped here may still get an earlier queued iterate as its result from ``resolve``.
        """
        self.iters[i] += 1
        last = self.state.get(i)
        if last is None or not np.array_equal(last[0], x):
            return False
        gmax = last[1]
        if gmax is None:  # undecided: test it later, together with others
            self._queue(i, self.iters[i], x)
            return False
        return gmax <= self.specs[i]["tol"]

    def _queue(self, i: int, iteration: int, x: np.ndarray) -> None:
        """Queue problem i's undecided iterate ``x`` (its last evaluated point) for the shared exact test."""
        if not self.queue:
            self.queued_at = self.rounds
        st = self.state[i]
        self.queue.append((i, iteration, x.copy(), st[2], st[3], st[4]))

    def _at_start(self, i: int, x: np.ndarray, gmax: float | None) -> None:
        """scipy's test of x0, before any step (``setulb`` makes it, but ours runs with gtol 0): a pass
        ends the run at iteration 0 with x0. Undecided, x0 is queued as iteration 0 like any iterate, so a
        later pass of the test finds it first."""
        if gmax is None:
            self._queue(i, 0, x)
        elif gmax <= self.specs[i]["tol"]:
            self.final[i] = (x.copy(), 0)

    def evaluate(self, xs: dict[int, np.ndarray]) -> dict[int, tuple[float, np.ndarray]]:
        """(loss, gradient) of each problem i at ``xs[i]``, all in one batch; may test queued iterates."""
        from scipy.special import expit, logsumexp

        keys = sorted(xs)
        r, k = self.r, self.k
        Gs = [xs[i][: r * k].reshape(r, k) for i in keys]
        raw = self.space.mul(np.hstack(Gs) if len(Gs) > 1 else Gs[0])
        for j, i in enumerate(keys):
            if self.specs[i]["intercept"]:
                raw[:, j * k:(j + 1) * k] += xs[i][r * k:]
        SW = np.column_stack([self.specs[i]["swn"] for i in keys])           # [n, m]
        if k == 1:
            yc = self.y[:, None]
            loss_i = np.logaddexp(0.0, raw) - yc * raw
            D = expit(raw) - yc
            losses = np.einsum("ij,ij->j", SW, loss_i)
        else:
            D = np.empty_like(raw)
            losses = np.empty(len(keys))
            rows = np.arange(len(self.y))
            for j in range(len(keys)):
                blk = raw[:, j * k:(j + 1) * k]
                lse = logsumexp(blk, axis=1)
                losses[j] = SW[:, j] @ (lse - blk[rows, self.y])
                D[:, j * k:(j + 1) * k] = np.exp(blk - lse[:, None]) - self.onehot
        D *= np.repeat(SW, k, axis=1) if k > 1 else SW
        gG_all = self.space.tmul(D)
        results = {}
        for j, i in enumerate(keys):
            spec, G = self.specs[i], Gs[j]
            cols = slice(j * k, (j + 1) * k)
            gG = gG_all[:, cols] + spec["l2"] * G
            loss = float(losses[j]) + 0.5 * spec["l2"] * float(np.sum(G * G))
            gb = D[:, cols].sum(axis=0)
            grad = np.concatenate([gG.ravel(), gb]) if spec["intercept"] else gG.ravel()
            results[i] = (loss, grad)
            if not self.space.primal:
                gb_max = float(np.max(np.abs(gb))) if spec["intercept"] else 0.0
                norm2 = float(np.sqrt(np.sum(gG * gG)))
                first = i not in self.state  # the run's first evaluation: at its starting point x0
                gmax = self._gradient_max(spec, norm2, gb_max)
                self.state[i] = (xs[i], gmax, gG, gb_max, norm2)
                if first:
                    self._at_start(i, xs[i], gmax)
        self.rounds += 1
        if self.queue and self._due():
            self.resolve()
        return results

    def _due(self) -> bool:
        """Whether to test the queued iterates now (one shared pass over Z costs about 4-8 rounds).

        Passes are spaced ``CHECK_AGE`` rounds apart, but only when some queued iterate of a running
        problem is likely to pass: max|g| / ||g||_2 has been nearly constant (0.022-0.032 on VGG-like
        features), so its largest value seen so far predicts the test from ||g||_2, which is free. When
        every run still going likely converged, waiting gains nothing and the pass runs at once. Only
        *when* to test depends on the prediction; every queued iterate is tested exactly before any result
        is used. Iterates of runs that have ended wait for the last pass.
        """
        live = self.running - set(self.final)
        queued = [q for q in self.queue if q[0] in live]
        if not queued:
            return False
        age = self.rounds - self.queued_at
        if self.rho <= 0.0:  # nothing learnt yet: test on the age rule alone
            return age >= self.CHECK_AGE
        likely = {q[0] for q in queued if self.rho * q[5] <= self.specs[q[0]]["tol"]}
        if likely and likely >= live:
            return True
        return age >= (self.CHECK_AGE if likely else 3 * self.CHECK_AGE)

    def resolve(self) -> None:
        """The exact D-space stop test for every queued iterate, with one shared product."""
        queue, self.queue = self.queue, []
        if not queue:
            return
        k = self.k
        self.exact_checks += 1
        gw_all = self.space.to_w(np.hstack([q[3] for q in queue]))
        for c, (i, it, x, _g, gb_max, norm2) in enumerate(queue):  # iteration order within a problem
            gw_max = float(np.max(np.abs(gw_all[:, c * k:(c + 1) * k])))
            if norm2 > 0:
                self.rho = max(self.rho, gw_max / norm2)
            if i in self.final:
                continue
            gmax = max(gb_max, gw_max)
            if gmax <= self.specs[i]["tol"]:
                self.final[i] = (x, it)

    def _gradient_max(self, spec: dict, norm2: float, gb_max: float) -> float | None:
        """max|grad| of the D-space gradient where cheap bounds decide the stop test; None: undecided.

        ||g||_inf lies in [||g||_2 / sqrt(D), ||g||_2] (``norm2`` = ||gG||_2 = ||g||_2: an isometry).
        """
        tol = spec["tol"]
        if norm2 <= tol or norm2 / np.sqrt(self.n_features) > tol:
            return max(gb_max, norm2 if norm2 <= tol else np.inf)
        if gb_max > tol:
            return gb_max
        return None


def _never(x: np.ndarray) -> bool:
    """The stop test of a primal run: none of ours (scipy's own gtol applies there, as in scikit-learn)."""
    return False


def solve_many(space: Space, y: np.ndarray, n_cls: int, problems: list[dict],
                progress_cb=None, n_features: int = 0, stats: dict | None = None,
                threads: int = 1) -> list[Solution]:
    """Run one scipy L-BFGS-B per problem (identical options to scikit-learn) sharing the products.

    All runs are stepped by this one thread (``_Lbfgsb``); each round evaluates every run that is still
    going in one batch (``_Evaluator``). Returns a ``Solution`` per problem; warning about the unconverged
    ones (status != 0) is the caller's business, as it is scikit-learn's after ``minimize``.
    ``stats`` (optional) receives the numbers of evaluation rounds and of exact stop-test passes.
    ``threads``: BLAS threads, more than one only where nothing else runs (see below).
    """
    from threadpoolctl import threadpool_limits

    r = space.r
    exact = not space.primal  # kernel space: apply the tol test in D-space ourselves
    ev = _Evaluator(space, y, n_cls, problems, n_features)
    runs = [_Lbfgsb(ev.n_params(i), maxiter=int(p["max_iter"]), gtol=0.0 if exact else float(p["tol"]),
                    ftol=64 * np.finfo(float).eps) for i, p in enumerate(problems)]

    accepts = [partial(ev.accepted, i) if exact else _never for i in range(len(runs))]

    def end(i: int) -> None:
        ev.ended(i)
        if progress_cb is not None:
            progress_cb()

    def step(i: int, want: dict) -> None:
        """Advance run i to its next evaluation (queued in ``want``) or to its end."""
        if runs[i].advance(accepts[i]):
            want[i] = runs[i].x.copy()
        else:
            end(i)

    # One BLAS thread for a search's folds: their shared products are triangular multiplies that measured
    # fastest on one thread here (6.8 ms against 10.7 ms on two for 4,186 rows x 14 columns), and
    # multi-threaded OpenBLAS spin-waits between the many small calls of L-BFGS-B (25x slower on a busy
    # 2-core box). A lone fit (one column: ?trmv) may use more: nothing else is running then.
    with threadpool_limits(threads, user_api="blas"):
        want: dict[int, np.ndarray] = {}
        for i in range(len(runs)):
            step(i, want)
        while want:
            results = ev.evaluate(want)
            asked, want = want, {}
            for i, (f, g) in results.items():
                if i in ev.final:  # an earlier iterate passed the stop test: this run is over
                    end(i)
                else:
                    runs[i].tell(asked[i], f, g)
                    step(i, want)
        ev.resolve()  # iterates still queued by runs that ended on their own
    if stats is not None:
        stats["rounds"] = stats.get("rounds", 0) + ev.rounds
        stats["exact_checks"] = stats.get("exact_checks", 0) + ev.exact_checks
    out = []
    for i, (p, run) in enumerate(zip(problems, runs, strict=True)):
        if i in ev.final:  # stopped by our (deferred) gradient test: scipy would have reported convergence,
            x, nit = ev.final[i]  # unless it had reached max_iter first (see ``_Lbfgsb.outcome``)
            status, msg = (1, _MAX_ITER) if nit >= run.maxiter else (0, _CONVERGED)
        else:
            x, nit = run.x, run.nit
            status, msg = run.outcome()
        G = x[: r * ev.k].reshape(r, ev.k)
        b = x[r * ev.k:] if p["fit_intercept"] else np.zeros(ev.k)
        out.append(Solution(G, b, nit, status, msg))
    return out
