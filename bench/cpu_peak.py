"""The CPU's float32 FMA peak right now, measured: what every CPU figure here is bounded by.

    python bench/cpu_peak.py [--threads 2]

Compiles (gcc/cc, -O2 -mavx2 -mfma -fopenmp) and runs a kernel of 12 independent AVX2 FMA
chains per thread, enough to fill both FMA pipes, and prints GFLOP/s. On the shared cloud
machines used here the figure moved between 160 and 200 GFLOP/s for 2 threads within an hour
(the host's clock / neighbours), so the benchmarks print it next to their timings. Returns None
where no C compiler or no AVX2 is available.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
from typing import Optional

_KERNEL = r"""
#include <immintrin.h>
#include <stdio.h>
#include <omp.h>
#define F(a) a = _mm256_fmadd_ps(a, b, c)
int main(void) {
  const long iters = 100000000L;
  double t0 = omp_get_wtime();
  float sink = 0;
  #pragma omp parallel reduction(+:sink)
  {
    __m256 b = _mm256_set1_ps(0.999999f), c = _mm256_set1_ps(1e-7f);
    __m256 a0 = b, a1 = c, a2 = b, a3 = c, a4 = b, a5 = c, a6 = b, a7 = c, a8 = b, a9 = c,
           a10 = b, a11 = c;
    for (long i = 0; i < iters; i++) {
      F(a0); F(a1); F(a2); F(a3); F(a4); F(a5); F(a6); F(a7); F(a8); F(a9); F(a10); F(a11);
      __asm__ volatile("" : "+x"(a0), "+x"(a1), "+x"(a2), "+x"(a3), "+x"(a4), "+x"(a5),
                       "+x"(a6), "+x"(a7), "+x"(a8), "+x"(a9), "+x"(a10), "+x"(a11));
    }
    __m256 s = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)),
               _mm256_add_ps(_mm256_add_ps(a4, a5), _mm256_add_ps(a6, a7)));
    s = _mm256_add_ps(s, _mm256_add_ps(_mm256_add_ps(a8, a9), _mm256_add_ps(a10, a11)));
    float o[8]; _mm256_storeu_ps(o, s); sink += o[0];
  }
  double t = omp_get_wtime() - t0;
  printf("%f %f\n", (double)iters * 12 * 8 * 2 * omp_get_max_threads() / t / 1e9, sink);
  return 0;
}
"""


def fma_peak(threads: int = 2) -> Optional[float]:
    """Measured float32 GFLOP/s of ``threads`` threads doing nothing but AVX2 FMAs."""
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = os.path.join(tmp, "fma.c"), os.path.join(tmp, "fma")
        with open(src, "w") as f:
            f.write(_KERNEL)
        try:
            subprocess.run([cc, "-O2", "-mavx2", "-mfma", "-fopenmp", src, "-o", exe],
                           check=True, capture_output=True, timeout=60)
            out = subprocess.run([exe], check=True, capture_output=True, text=True, timeout=60,
                                 env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
        except (subprocess.SubprocessError, OSError):
            return None
    return float(out.stdout.split()[0])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    g = fma_peak(args.threads)
    print(f"float32 FMA peak, {args.threads} threads: "
          + (f"{g:.1f} GFLOP/s" if g else "unavailable (no C compiler or no AVX2)"))


if __name__ == "__main__":
    main()
