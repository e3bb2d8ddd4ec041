"""Scaling-law analysis of sweep results: run folders -> pandas -> fits -> plots (python -m scaling.analyze).

Imports pandas, numpy, scipy and matplotlib, never torch, so it starts fast on a login node.
"""

import os

# The fits make thousands of L-BFGS-B runs on 5 parameters; OpenBLAS waking its threads for each tiny step made
# them 6-25x slower on a busy 2-core machine (50 fits: 2.4-9.4 s, 0.4 s with one thread). It only takes effect
# for BLAS libraries loaded after this, which for the CLI is all of them.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
