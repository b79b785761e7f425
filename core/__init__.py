"""Classifier Lab engine: datasets, model zoo, memory calculator, trainer, metrics, prediction.

Nothing in this package imports Gradio; the dashboard in ``ui/`` only drives it.
"""

import os as _os

# PyTorch's CPU threads (libgomp) spin-wait between parallel regions. On a 2-core machine that another
# process keeps busy (a second run, the browser, a class server), the spinning threads fight it for the
# cores: a tutorial-Net step with 2 threads took 0.05-0.34 s instead of 0.009 s. With a short spin
# (GOMP_SPINCOUNT=10000) the same step took a steady 0.032 s under that load and the same 0.009 s on an
# idle machine (measured side by side, 2026-12-05). libgomp reads it when torch loads it, so this runs
# before any engine module imports torch; a value set by the user is kept.
_os.environ.setdefault("GOMP_SPINCOUNT", "10000")
