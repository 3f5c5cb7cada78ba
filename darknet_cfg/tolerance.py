"""How far our numbers may lie from Darknet's, and why: the one place for every parity bound.

Darknet and PyTorch add the same float32 products in different orders, and the order itself
depends on the CPU (oneDNN and MKL pick AVX2, AVX-512 or AMX kernels at run time), so layer
outputs agree to float32 noise, not to the bit. The oracle README measured that noise on the
detection-layer outputs of 24 models between independent implementations (OpenCV, a PyTorch
re-implementation): at most 1.3e-4, with objectness and class probabilities at most 4.2e-5
(yolov4-csp-x-swish). The bounds below are the project's answer, used by the test suite and by
``darknet-cfg verify`` alike:

* ``HEAD_RTOL``: a head output ``x`` may differ by ``HEAD_RTOL * max(1, |x|)`` (the oracle
  README's tolerance).
* ``PROB_ATOL``: an objectness or class probability may differ by this much (>= 2x the largest
  probability noise measured above).
* ``BORDERLINE``: a detection whose objectness or class probability lies within this band of the
  threshold may fall on either side of it on another CPU or in another implementation. It is
  reported and counted, and excluded from the exact comparison (the same size as ``PROB_ATOL``:
  a value that may move by ``PROB_ATOL`` may cross a threshold that close).

Box coordinates get no fixed bound: :func:`box_tolerance` propagates ``HEAD_RTOL`` through the
head's own decoding, so a box whose size is ``exp(tw)`` gets a relative bound and one whose size
is ``(2 * sigmoid)^2`` (``new_coords=1``) twice the relative error of its input.
"""
from __future__ import annotations

HEAD_RTOL = 1e-4
PROB_ATOL = 1e-4
BORDERLINE = 1e-4

__all__ = ["HEAD_RTOL", "PROB_ATOL", "BORDERLINE"]
