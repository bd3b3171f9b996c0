"""Triangular BLAS/LAPACK calls (?trmm, ?trmv, ?trsm, ?potrf) that release the GIL.

Why: scipy's Python wrappers (``scipy.linalg.blas.dtrmm`` ...) keep the GIL for the whole call. The
logistic-regression grid prepares the next fold on a background thread while the current fold's L-BFGS
runs, and its per-round triangular multiplies would then stall that thread (measured: standardising a
fold took 0.37-0.58 s instead of 0.26 s next to a loop of scipy's dtrmm, 0.26 s next to this one).
These call the very same routines -- scipy's own BLAS/LAPACK, through the function pointers that
``scipy.linalg.cython_blas`` / ``cython_lapack`` export -- via ctypes, which releases the GIL for the
duration of a foreign call. Matrices are Fortran-ordered float64 (or float32 for ?trmm/?trmv/?trsm),
checked.
"""
from __future__ import annotations

import ctypes
from functools import cache

import numpy as np

_INT, _DBL = ctypes.c_int, ctypes.c_double
_P = ctypes.c_void_p


def _pointer(module, name: str) -> int:
    """Address of a routine exported in a Cython module's ``__pyx_capi__`` capsule table."""
    capsule = module.__pyx_capi__[name]
    get_name = ctypes.pythonapi.PyCapsule_GetName
    get_name.restype, get_name.argtypes = ctypes.c_char_p, [ctypes.py_object]
    get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
    get_pointer.restype, get_pointer.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
    return get_pointer(capsule, get_name(capsule))


@cache
def _routines() -> dict:
    from scipy.linalg import cython_blas, cython_lapack

    tri = ctypes.CFUNCTYPE(None, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P)  # side..ldb, all by pointer
    trv = ctypes.CFUNCTYPE(None, _P, _P, _P, _P, _P, _P, _P, _P)  # uplo, trans, diag, n, a, lda, x, incx
    potrf = ctypes.CFUNCTYPE(None, _P, _P, _P, _P, _P)                         # uplo, n, a, lda, info
    names = ("dtrmm", "dtrsm", "strmm", "strsm")
    return {**{nm: tri(_pointer(cython_blas, nm)) for nm in names},
            **{nm: trv(_pointer(cython_blas, nm)) for nm in ("dtrmv", "strmv")},
            **{nm: potrf(_pointer(cython_lapack, nm)) for nm in ("dpotrf", "spotrf")}}


def _ref(value) -> ctypes._Pointer:
    return ctypes.byref(value)


def _prefix(a: np.ndarray, name: str) -> str:
    """BLAS's type letter for ``a`` ("s" float32, "d" float64), after checking it is Fortran-ordered."""
    dtype = np.float32 if a.dtype == np.float32 else np.float64
    if a.dtype != dtype or not a.flags.f_contiguous:
        raise ValueError(f"{name} must be a Fortran-ordered float64 or float32 array")
    return "s" if dtype == np.float32 else "d"


def _triangular(routine: str, L: np.ndarray, B: np.ndarray, trans: bool) -> np.ndarray:
    routine = _prefix(L, "L") + routine
    single = routine[0] == "s"
    out = np.array(B, dtype=L.dtype, order="F", copy=True)
    if out.ndim != 2 or L.shape[0] != L.shape[1] or L.shape[0] != out.shape[0]:
        raise ValueError(f"shapes {L.shape} and {B.shape} do not match")
    m, n, lda = _INT(out.shape[0]), _INT(out.shape[1]), _INT(max(1, L.shape[0]))
    one = (ctypes.c_float if single else _DBL)(1.0)
    side, uplo, ta, diag = (ctypes.c_char(c) for c in (b"L", b"L", b"T" if trans else b"N", b"N"))
    if out.size:
        _routines()[routine](_ref(side), _ref(uplo), _ref(ta), _ref(diag), _ref(m), _ref(n), _ref(one),
                             L.ctypes.data_as(_P), _ref(lda), out.ctypes.data_as(_P), _ref(m))
    return out


def trmm(L: np.ndarray, B: np.ndarray, trans: bool = False) -> np.ndarray:
    """L @ B (or L.T @ B) for lower-triangular L, in L's precision (float32 or float64); B is not modified."""
    return _triangular("trmm", L, B, trans)


def trmv(L: np.ndarray, x: np.ndarray, trans: bool = False) -> np.ndarray:
    """L @ x (or L.T @ x) for lower-triangular L and a vector x, in L's precision; x is not modified.

    Why beside ``trmm``: for one right-hand column OpenBLAS's ?trmm ran at less than half the speed of
    ?trmv here (12.3 against 5.5 ms at 5,232 rows, one thread), and ?trmv also uses a second thread
    where one is allowed (2.7 ms), which ?trmm with one column does not.
    """
    routine = _prefix(L, "L") + "trmv"
    out = np.array(x, dtype=L.dtype, copy=True)
    if out.ndim != 1 or L.shape[0] != L.shape[1] or L.shape[0] != out.shape[0]:
        raise ValueError(f"shapes {L.shape} and {x.shape} do not match")
    n, lda, inc = _INT(out.shape[0]), _INT(max(1, L.shape[0])), _INT(1)
    uplo, ta, diag = (ctypes.c_char(c) for c in (b"L", b"T" if trans else b"N", b"N"))
    if out.size:
        _routines()[routine](_ref(uplo), _ref(ta), _ref(diag), _ref(n), L.ctypes.data_as(_P), _ref(lda),
                             out.ctypes.data_as(_P), _ref(inc))
    return out


def trsm(L: np.ndarray, B: np.ndarray, trans: bool = False) -> np.ndarray:
    """L^-1 B (or L^-T B) for lower-triangular, non-singular L, in L's precision; B is not modified."""
    return _triangular("trsm", L, B, trans)


def potrf(A: np.ndarray) -> int:
    """Lower Cholesky factor of A in place (A's lower triangle is read; the upper is left as it was).

    A is a Fortran-ordered float64 (dpotrf) or float32 (spotrf) array.
    Returns LAPACK's info: 0 on success, k > 0 if the leading minor of order k is not positive definite.
    """
    routine = _prefix(A, "A") + "potrf"
    n, lda, info = _INT(A.shape[0]), _INT(max(1, A.shape[0])), _INT(0)
    uplo = ctypes.c_char(b"L")
    _routines()[routine](_ref(uplo), _ref(n), A.ctypes.data_as(_P), _ref(lda), _ref(info))
    return int(info.value)
