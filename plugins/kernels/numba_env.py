"""Where numba's cache lives and how it is imported: only here, only when needed.

numba reads ``NUMBA_CACHE_DIR`` once, when it is imported, so the cache
directory is settled before the first import:

1. ``NUMBA_CACHE_DIR`` if set and writable;
2. if set but read-only (a cache pre-built by ``shardserve warmup`` and
   shipped in a read-only image), its files are copied to a writable temp dir
   that becomes the cache;
3. if unset and this package's directory is writable: numba's default, the
   ``__pycache__`` next to the kernel modules;
4. if unset and the package is read-only (AWS Lambda's /var/task): a temp dir
   seeded with any cache files shipped in that ``__pycache__``.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger("shardserve.kernels")

PACKAGE_DIR = Path(__file__).resolve().parent
TEMP_CACHE_NAME = "shardserve-numba-cache"
THREADING_LAYERS = ("default", "safe", "threadsafe", "forksafe", "tbb", "omp", "workqueue")
_lock = threading.Lock()


def _writable(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError:
        return False
    return True


def _numba_subdir(source_dir: Path) -> str:
    """numba's name for a source directory's cache under NUMBA_CACHE_DIR."""
    text = str(source_dir)
    return f"{source_dir.name}_{hashlib.sha1(text.encode()).hexdigest()}"


def _seed(target: Path, shipped: Path, in_tree: bool) -> None:
    """Copy cache files from a read-only place into the writable cache."""
    if not shipped.is_dir():
        return
    copied = 0
    if in_tree:  # <package>/__pycache__/*.nbi -> <cache>/<numba subdir>/*.nbi
        dest = target / _numba_subdir(PACKAGE_DIR)
        dest.mkdir(parents=True, exist_ok=True)
        for item in shipped.iterdir():
            if item.suffix in (".nbi", ".nbc") and not (dest / item.name).exists():
                shutil.copy2(item, dest / item.name)
                copied += 1
    else:
        for item in shipped.rglob("*"):
            rel = item.relative_to(shipped)
            if item.is_file() and not (target / rel).exists():
                (target / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(item, target / rel)
                copied += 1
    if copied:
        log.info("seeded the numba cache with %d pre-built files", copied)


def resolve_cache_dir(environ: dict | None = None) -> Path | None:
    """Settle ``NUMBA_CACHE_DIR`` (see the module doc); ``None`` means in-tree."""
    env = os.environ if environ is None else environ
    temp = Path(tempfile.gettempdir()) / TEMP_CACHE_NAME
    given = env.get("NUMBA_CACHE_DIR")
    if given:
        path = Path(given)
        if _writable(path):
            return path
        _writable(temp)
        _seed(temp, path, in_tree=False)
    elif _writable(PACKAGE_DIR / "__pycache__"):
        return None
    else:
        _writable(temp)
        _seed(temp, PACKAGE_DIR / "__pycache__", in_tree=True)
    env["NUMBA_CACHE_DIR"] = str(temp)
    return temp


def _limit_blas_threads() -> None:
    """numba's ``np.dot`` calls scipy's OpenBLAS, which reads its thread count
    once, when loaded. One thread per request (as onnxruntime's
    ``intra_op_threads = 1``) by default: a multi-threaded BLAS on a busy
    machine turns a 40 µs product into milliseconds of spinning.
    ``SHARDSERVE_NUMBA_BLAS_THREADS`` (0 = OpenBLAS's default) or
    ``OPENBLAS_NUM_THREADS`` change it. numpy's own BLAS is left alone."""
    wanted = os.environ.get("SHARDSERVE_NUMBA_BLAS_THREADS", "1")
    if os.environ.get("OPENBLAS_CORETYPE"):  # narrower kernels than the CPU has: say so
        log.info("numba's BLAS products run OpenBLAS's %s kernels (OPENBLAS_CORETYPE)",
                 os.environ["OPENBLAS_CORETYPE"][:32])
    if "scipy.linalg" in sys.modules or "OPENBLAS_NUM_THREADS" in os.environ or wanted == "0":
        return
    os.environ["OPENBLAS_NUM_THREADS"] = wanted
    try:
        import scipy.linalg.cython_blas  # noqa: F401  loads scipy's OpenBLAS now
    except ImportError:  # numba then has no np.dot, and says so at load
        pass
    finally:
        del os.environ["OPENBLAS_NUM_THREADS"]


def numba_module() -> Any:
    """Import numba after settling its cache directory and BLAS threads (idempotent)."""
    if sys.modules.get("numba") is not None:
        return sys.modules["numba"]
    with _lock:
        if "numba" not in sys.modules:
            resolve_cache_dir()
            _limit_blas_threads()
        import numba
    return numba


def cache_dir() -> Path:
    """The directory numba writes compiled kernels to (after :func:`numba_module`)."""
    numba = numba_module()
    configured = numba.config.CACHE_DIR
    return Path(configured) if configured else PACKAGE_DIR / "__pycache__"


def configure_threads(threads: int | None = None, layer: str | None = None) -> None:
    """Apply a model's ``[numba]`` threading options (the thread count is per thread).

    Only ``threads >= 2`` starts numba's thread pool: until then no threading
    layer is initialised, so a server may still fork workers safely.
    """
    numba = numba_module()
    if layer is not None:
        if layer not in THREADING_LAYERS:
            raise ValueError(f"threading_layer must be one of {', '.join(THREADING_LAYERS)}")
        numba.config.THREADING_LAYER = layer
    if threads is not None:
        if not 1 <= threads <= numba.config.NUMBA_NUM_THREADS:
            raise ValueError(f"threads must be 1..{numba.config.NUMBA_NUM_THREADS}")
        if threads > 1:
            numba.set_num_threads(threads)


# a 16-float multiply-add in a function that may use 512-bit vectors (LLVM splits them
# for CPUs tuned to prefer 256-bit ones otherwise)
_FMA16_IR = """
define <16 x float> @f(<16 x float> %a, <16 x float> %b, <16 x float> %c) #0 {
  %r = call <16 x float> @llvm.fma.v16f32(<16 x float> %a, <16 x float> %b, <16 x float> %c)
  ret <16 x float> %r
}
declare <16 x float> @llvm.fma.v16f32(<16 x float>, <16 x float>, <16 x float>)
attributes #0 = { "min-legal-vector-width"="512" }
"""


@functools.cache
def panel_tiles() -> bool:
    """Whether the float32 products use :mod:`.gemm`'s 8 x 32 panel tiles (Conv, and
    the packed weights of ``Linear`` and ``SelfAttention``) rather than BLAS: only
    where numba's compile target has AVX-512 (avx512f). A tile keeps 16 vectors of 16
    floats in registers: AVX-512's 32 registers hold them; AVX2's 16 (or NEON's 32 of
    4 floats) do not, the tile spills and runs at a third of BLAS's speed.

    The target is numba's: ``NUMBA_CPU_NAME`` and ``NUMBA_CPU_FEATURES`` (or the host's
    CPU and features, less AVX with ``NUMBA_ENABLE_AVX=0``). LLVM compiles one 16-float
    multiply-add for it and the answer is whether that used a zmm register."""
    try:
        numba_module()
        import llvmlite.binding as ll
        from numba.core import config
        from numba.core.codegen import get_host_cpu_features
    except ImportError:  # no numba: loading the kernels fails next and says so
        return False

    ll.initialize_native_target()  # numba does it when it compiles first: idempotent
    ll.initialize_native_asmprinter()
    target = ll.Target.from_default_triple()
    if not target.name.startswith("x86"):
        return False
    name = config.CPU_NAME or ll.get_host_cpu_name()
    features = config.CPU_FEATURES if config.CPU_FEATURES is not None else get_host_cpu_features()
    try:
        machine = target.create_target_machine(cpu=name, features=features, opt=2)
        assembly = machine.emit_assembly(ll.parse_assembly(_FMA16_IR))
    except RuntimeError:  # a CPU name or feature LLVM does not know: numba fails later
        return False
    wide = "zmm" in assembly
    log.debug("numba target %s: %s", name, "AVX-512 panel tiles" if wide else "BLAS products")
    return wide


def jit(*args: Any, **kwargs: Any) -> Any:
    """``numba.njit`` with the on-disk cache on: the decorator every kernel uses."""
    numba = numba_module()
    kwargs.setdefault("cache", True)
    return numba.njit(*args, **kwargs)
