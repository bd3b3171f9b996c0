"""The isometric space of a logistic-regression fold: Gram matrix, its Cholesky factor, fold preparation.

Why: with more features than rows (VGG16 flatten: 25,088 > 5,232) L-BFGS on the standardised rows Z only
moves inside the span of Z's rows, so each problem is solved on the [n, r] factor F of Z Z^T instead of
[n, D] (``Space``); see ``featcache.heads.logreg`` for why the iterates stay scikit-learn's. The Grams are
the search's only O(n^2 D) work, so they are built in pieces that any thread may take (``Tasks``,
``GramJob``) while the previous fold solves (``Prefetcher``), in reused buffers (``Workspace``).
"""
from __future__ import annotations

import threading
from functools import partial
from typing import Any

import numpy as np

from featcache.heads import _blas
from featcache.heads.logreg_stats import CHUNK_ROWS


def _gram_tol(dtype: np.dtype, diag_max: float) -> float:
    """Pivots below this are rounding noise of the float32 Gram (relative error ~ sqrt(D) * eps32)."""
    return diag_max * (1e-5 if dtype == np.float32 else 1e-11)


class Tasks:
    """Independent pieces of work that any thread may take: the prefetch thread or a consumer that waits.

    Why: the next fold's preparation (standardising rows, then the Gram) runs on a background thread
    while the current fold solves; when the consumer would otherwise wait for it, it takes pieces
    itself, so both cores stay busy, each on one BLAS thread. An error in a piece is raised by ``run``.
    """

    def __init__(self, tasks: list):
        self._tasks = tasks
        self._next = 0
        self._running = 0
        self._cond = threading.Condition()
        self._error: BaseException | None = None

    def run_one(self) -> bool:
        """Run one piece nobody has taken yet; False when none is left to take (or one failed)."""
        with self._cond:
            if self._next >= len(self._tasks) or self._error is not None:
                return False
            task = self._tasks[self._next]
            self._next += 1
            self._running += 1
        try:
            task()
        except BaseException as exc:  # raised by run(), in the thread that owns the job
            with self._cond:
                self._error = self._error or exc
        finally:
            with self._cond:
                self._running -= 1
                self._cond.notify_all()
        return True

    def run(self) -> None:
        """Take pieces until none is left, wait for the ones other threads are running, raise an error."""
        while self.run_one():
            pass
        with self._cond:
            while self._running:
                self._cond.wait()
        if self._error is not None:
            raise self._error


class GramJob(Tasks):
    """Z Z^T in blocks that any thread may compute (see ``Tasks``).

    The upper triangle of a C-ordered array is filled block by block with numpy's matmul; read as
    Fortran order the same memory holds the lower triangle (``K()``). Why numpy: scipy's BLAS wrappers
    (SYRK) hold the GIL for the whole call, numpy's matmul releases it, so a Gram can be built while the
    L-BFGS runs are stepped. Same FLOPs as SYRK: diagonal blocks are A @ A.T (numpy calls SYRK for those),
    the others lie right of the diagonal.
    """

    SIDE = 3  # blocks per side: 6 pieces; bigger blocks ran 10% faster than 1,024-row ones (4,186 rows)

    def __init__(self, Z: np.ndarray, out: np.ndarray | None = None):
        n = Z.shape[0]
        b = max(256, -(-n // self.SIDE))
        self.Z = Z
        self.C = (np.empty((n, n), dtype=Z.dtype) if out is None or out.size < n * n
                  else out[: n * n].reshape(n, n))
        super().__init__([partial(self._block, s, min(n, s + b), c, min(n, c + b))
                          for s in range(0, n, b) for c in range(s, n, b)])

    def _block(self, s: int, e: int, c: int, d: int) -> None:
        np.matmul(self.Z[s:e], self.Z[c:d].T, out=self.C[s:e, c:d])

    def K(self) -> np.ndarray:
        return self.C.T


def _gram(Z: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Z Z^T: its lower triangle, in a Fortran-ordered [n, n] array in Z's precision."""
    job = GramJob(Z, out)
    job.run()
    return job.K()


class Workspace:
    """Buffers reused across a search's folds and its refit.

    Why: a fresh half-gigabyte array per fold costs page faults (measured 0.3 s just to convert one
    4,186-row Gram to float64 into new memory), and the folds run one after another anyway. ``chol`` (the
    float64 factor) may be shared by workspaces whose factors are never needed at the same time.
    """

    def __init__(self, rows: int, d: int, dtype: np.dtype, gram_rows: int, chol: np.ndarray | None = None):
        self.rows = np.empty((rows, d), dtype=dtype)          # standardised rows of a fold
        small = gram_rows < d
        self.gram_in = np.empty(gram_rows * gram_rows, dtype=dtype) if small else None  # Z Z^T
        self.chol = chol if chol is not None or not small else np.empty(gram_rows * gram_rows)

    def square(self, n: int) -> np.ndarray:
        """An [n, n] float64 Fortran-ordered view of the factor buffer (or a new array)."""
        if self.chol is None or self.chol.size < n * n:
            return np.empty((n, n), order="F")
        return self.chol[: n * n].reshape((n, n), order="F")


def _float64_square(K: np.ndarray, m: int, work: Workspace | None, copy: bool = True) -> np.ndarray:
    """An [m, m] float64 Fortran array in ``work``'s factor buffer (or new), holding K[:m, :m] if ``copy``."""
    A = work.square(m) if work is not None else np.empty((m, m), order="F")
    if copy:
        # only K's lower triangle is the Gram; the upper one is whatever the reused buffer held, which may
        # be a signalling-NaN pattern whose cast raised "invalid value encountered in cast" on the terminal
        # (LAPACK reads the lower triangle only, so the warning meant nothing)
        with np.errstate(invalid="ignore"):
            np.copyto(A, K[:m, :m])
    return A


_WIDEN_COLS = 256  # columns per step of _potrf's in-place float32 -> float64 widening (4 MB temporaries)


def _potrf(K: np.ndarray, m: int, work: Workspace | None) -> tuple[np.ndarray, int]:
    """(lower Cholesky factor of K[:m, :m] as a float64 [m, m] Fortran array, LAPACK's info).

    K is not modified. The factor lands in ``work``'s factor buffer (``Workspace.square``).

    Why float32 for a float32 K: ``spotrf`` takes half the time of ``dpotrf`` (0.28-0.44 s against
    0.69-0.90 s at 4,185 rows here), and its rounding is of the same order as the Gram's own: on a
    synthetic VGG fold, ||L L^T - K_exact|| / ||K|| measured 3.9e-7 with ``spotrf`` against 1.2e-7 with
    ``dpotrf`` (the float32 Gram's own error), and the refit's coefficients moved by 3.9e-6 relative,
    against 9.4e-5 between ours and scikit-learn's. On real VGG16 features, where many fits stop at
    max_iter unconverged, 5 of 14 mean CV scores moved by 0.0002-0.0015 (scikit-learn's own float32
    and float64 runs differ by up to 0.0017 there). The solves still run in float64 (the factor is
    widened). No extra memory: the float32 copy is factored in the second half of the float64 buffer
    and widened into it column block by column block, left to right: writing float64 columns [a, b)
    overwrites float32 columns [2a - m, 2b - m), all left of b, so none that is still to be read.
    """
    c = _float64_square(K, m, work, copy=K.dtype != np.float32)
    if K.dtype != np.float32:
        return c, _blas.potrf(c)  # GIL-free: the prefetch thread keeps running
    s = c.reshape(-1, order="F").view(np.float32)[m * m:].reshape((m, m), order="F")
    np.copyto(s, K[:m, :m])
    info = _blas.potrf(s)
    # Whole columns. The upper triangle is never read (the triangular routines take the lower one), and
    # a Gram built block by block leaves it unwritten: it may hold any bit pattern, NaN included, whose
    # widening would only raise numpy's "invalid value encountered in cast" warning.
    with np.errstate(invalid="ignore"):
        for a in range(0, m, _WIDEN_COLS):
            b = min(m, a + _WIDEN_COLS)
            c[:, a:b] = s[:, a:b]  # numpy buffers the overlap of these two blocks
    return c, info


def _cholesky(K: np.ndarray, tol: float, work: Workspace | None = None, centered: bool = False
              ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, int]:
    """(L11 [r, r] lower, L21 [n-r, r] or None, pivot order, rank) with F F^T = K for F[piv] = [L11; L21].

    K's lower triangle is read (in any float precision) and not modified; the factor is float64. Plain
    Cholesky when K is clearly positive definite (no pivoting: about half the time of the pivoted one);
    pivoted Cholesky, stopping at rank r, when it is not (duplicate or collinear rows). A float32 K is
    factored in float32 (see ``_potrf``).

    ``centered``: the rows of Z sum to zero, as a training set standardised with its own mean does. Then
    Z Z^T 1 = 0: the rank is at most n - 1, and the last pivot of a plain Cholesky is rounding noise of
    either sign. Its noise is a sum over all n^2 Gram entries (the null vector is all ones), so about n
    times ``tol``: on the 4,186-row synthetic VGG folds it measured -460 to +460, against tol = 0.52.
    Left to chance, that pivot either failed ``potrf`` at the very last row (the fold then paid a wasted
    ``potrf`` plus the GIL-holding pivoted one, about 1 s) or was kept as a spurious direction made of
    noise. So the first n - 1 rows are factored and the last row of F is their exact continuation,
    F_n = K[n, :n-1] L11^-T. The pivot left over, K[n, n] - |F_n|^2, must lie within n * tol (measured at
    most 0.21 n * tol); otherwise, as when rows standardised with another set's mean are passed, the
    general path below runs.
    """
    from scipy.linalg.lapack import dpstrf

    n = K.shape[0]
    if centered and n > 2:
        m = n - 1
        c, info = _potrf(K, m, work)
        if info == 0 and float(np.min(np.diag(c))) ** 2 > tol:
            last = _blas.trsm(c, np.asarray(K[m, :m], dtype=np.float64).reshape(m, 1)).T
            if abs(float(K[m, m]) - float(last[0] @ last[0])) <= n * tol:
                return c, last, np.arange(n), m
    c, info = _potrf(K, n, work)
    if info == 0 and float(np.min(np.diag(c))) ** 2 > tol:
        return c, None, np.arange(n), n
    c, piv, rank, info = dpstrf(_float64_square(K, n, work), lower=1, tol=tol, overwrite_a=1)
    if info < 0:
        raise RuntimeError(f"pivoted Cholesky failed (info={info})")
    L21 = np.ascontiguousarray(c[rank:, :rank]) if rank < n else None
    return np.asfortranarray(c[:rank, :rank]), L21, piv - 1, rank


class Space:
    """F (training rows) with F F^T = Z Z^T, plus the map back to coefficients.

    F is kept as its triangular Cholesky factor: products with it are triangular multiplies (TRMM),
    which read half the matrix (measured 6.8 ms against 27 ms for a dense GEMM at 4,186 rows).
    """

    def __init__(self, Z: np.ndarray, work: Workspace | None = None, K: np.ndarray | None = None,
                 centered: bool = False):
        n, D = Z.shape
        self.n = n
        self.primal = n >= D
        if self.primal:  # the rows themselves are the cheapest factor
            self.F = Z.astype(np.float64)
            self.r = D
            return
        K = _gram(Z, None if work is None else work.gram_in) if K is None else K
        tol = _gram_tol(Z.dtype, float(np.max(np.diag(K))))
        self.L11, self.L21, piv, self.r = _cholesky(K, tol, work, centered)
        del K
        self.piv, self.rest = piv[:self.r], piv[self.r:]
        self.prefix = bool(np.all(self.piv == np.arange(self.r)))
        self.at_piv = slice(0, self.r) if self.prefix else self.piv  # a slice indexes without a gather
        self.identity = self.L21 is None and self.prefix
        self.Z = Z

    def _alpha(self, G: np.ndarray) -> np.ndarray:
        """[n, k] row weights with Z^T alpha = Q G (Q = Z_p^T L11^-T)."""
        return self._scatter(_blas.trsm(self.L11, G, trans=True))

    PASS_ROWS = 64        # rows of Z per product in a pass for few columns (see to_w)
    PASS_COLUMNS = (2, 24)  # the column counts for which those products are used

    def to_w(self, G: np.ndarray) -> np.ndarray:
        """Q @ G: the D-space vectors of F-space ones (kernel space; one pass over Z, in Z's precision).

        Why in 64-row pieces for 2-24 columns: one sgemm over the whole of Z first packs all of it (a
        copy of the fold's 420 MB); pieces are packed while they are in the cache. Measured alone at 4,186
        x 25,088, one thread: 46-56 ms against 76-79 ms for 2-8 columns, 76-102 against 92-115 for 14-24;
        the same for 1 (sgemv) and 28, slower for 30 (130 against 115 ms). Inside a search the passes
        took 2.39-2.47 s against 2.79-2.83 s (26 passes; 32-, 48- and 96-row pieces were no better alone).
        """
        a = self._alpha(G).astype(self.Z.dtype)
        lo, hi = self.PASS_COLUMNS
        if not lo <= a.shape[1] <= hi:
            # alpha^T Z, not Z^T alpha: OpenBLAS runs this orientation 1.6-2.6x faster for 14-112 columns
            return (a.T @ self.Z).T
        out = np.zeros((a.shape[1], self.Z.shape[1]), dtype=self.Z.dtype)
        piece = np.empty_like(out)
        for s in range(0, self.n, self.PASS_ROWS):
            np.matmul(a[s:s + self.PASS_ROWS].T, self.Z[s:s + self.PASS_ROWS], out=piece)
            out += piece
        return out.T

    def decisions(self, Zte: np.ndarray, G: np.ndarray) -> np.ndarray:
        """Zte @ w for the solutions G (columns side by side), w = Q G: the fold's test-row decision values.

        Why through w: Zte Z^T (the test-row kernel) would cost n_te * n * D multiply-adds per fold; w
        costs one pass over Z for all candidates together, and Zte @ w one pass over Zte.
        """
        if self.primal:
            return Zte @ G
        return (Zte @ self.to_w(G)).astype(np.float64)

    NARROW = 2  # right-hand columns up to which one ?trmv per column beats ?trmm (see _blas.trmv)

    def _tri(self, B: np.ndarray, trans: bool) -> np.ndarray:
        """L11 @ B (or L11.T @ B)."""
        if B.shape[1] > self.NARROW:
            return _blas.trmm(self.L11, B, trans=trans)
        return np.column_stack([_blas.trmv(self.L11, B[:, c], trans=trans) for c in range(B.shape[1])])

    def mul(self, G: np.ndarray) -> np.ndarray:
        """F @ G."""
        if self.primal:
            return self.F @ G
        top = self._tri(G, False)
        if self.identity:
            return top
        out = np.empty((self.n, G.shape[1]))
        out[self.at_piv] = top
        if self.L21 is not None:
            out[self.rest] = self.L21 @ G
        return out

    def tmul(self, R: np.ndarray) -> np.ndarray:
        """F.T @ R."""
        if self.primal:
            return self.F.T @ R
        if self.identity:
            return self._tri(R, True)
        out = self._tri(R[self.at_piv], True)
        if self.L21 is not None:
            out += self.L21.T @ R[self.rest]
        return out

    def _scatter(self, alpha: np.ndarray) -> np.ndarray:
        """[n, k] with ``alpha`` on the pivot rows: Z_p^T alpha == Z^T scatter(alpha)."""
        if self.identity:
            return alpha
        out = np.zeros((self.n, alpha.shape[1]))
        out[self.at_piv] = alpha
        return out

    def coefficients(self, Z: np.ndarray, G: np.ndarray) -> np.ndarray:
        """w (D x k) for the solution G: w = Z_p^T L11^-T G (or G itself in the primal case)."""
        if self.primal:
            return G
        a = self._alpha(G)
        w = np.zeros((Z.shape[1], a.shape[1]))
        for s in range(0, Z.shape[0], CHUNK_ROWS):  # float64 products without a float64 copy of Z
            w += Z[s:s + CHUNK_ROWS].T.astype(np.float64) @ a[s:s + CHUNK_ROWS]
        return w


class Prefetcher:
    """Prepares the next fold (standardised rows and Gram) on a background thread while this one solves.

    Why: a fold's 14 solves are Python-driven L-BFGS that keep about one core busy (1.7 s at 4,186 rows),
    while the next fold's Gram is BLAS that releases the GIL. The consumer, when it has to wait, computes
    blocks of the Gram being prepared itself (``GramJob``), so the two cores share whatever is left.
    Two workspaces alternate: job i is prepared in ``works[i % 2]`` once the consumer has released job
    i-2's. A context manager, so that an error on either side stops the other.

    ``make(job, work)`` returns ``(payload, phases)``: ``phases`` (``Tasks``, each needing the ones
    before it) are run here, with the consumer's help, before the payload is handed over.
    """

    def __init__(self, make, jobs: list, works: list[Workspace]):
        import queue

        self._queue: Any = queue.Queue()
        self._free = threading.Semaphore(len(works))
        self._closed = False
        self._current: Tasks | None = None
        self._thread = threading.Thread(target=self._produce, args=(make, jobs, works), daemon=True)

    def __enter__(self) -> Prefetcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._closed = True
        self._free.release()  # a producer waiting for a workspace wakes up and sees _closed
        self._thread.join()

    def _produce(self, make, jobs: list, works: list[Workspace]) -> None:
        try:
            for i, job in enumerate(jobs):
                self._free.acquire()
                if self._closed:
                    return
                payload, phases = make(job, works[i % len(works)])
                for phase in phases:
                    self._current = phase
                    phase.run()
                self._current = None
                self._queue.put((True, payload))
        except BaseException as exc:  # handed to the consumer, raised there
            self._queue.put((False, exc))

    def get(self) -> Any:
        """The next prepared payload; while it is not ready, help prepare it."""
        import queue

        while True:
            try:
                ok, value = self._queue.get(timeout=0.005)
                break
            except queue.Empty:
                phase = self._current
                while phase is not None and phase.run_one():
                    pass
        if not ok:
            raise value
        return value

    def release(self) -> None:
        """The consumer is done with the oldest job it got: its workspace may be reused."""
        self._free.release()
