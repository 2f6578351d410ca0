"""`hf-seqarch compare`: LSTM, transformers, Mamba-2, linear attention and a hybrid side by side on this machine.

presets.py (run sizes and budgets), architectures.py (what is compared, matched parameters), tasks.py
(MQAR, selective copying, held-out text), measure.py (speed, memory, decoding), train.py (the Trainer
budget and scores), verdicts.py (one verdict per claim), report.py, plots.py, run.py (the run itself).
"""

from .run import run_compare

__all__ = ["run_compare"]
