"""Load time of the embedded default model from the kneurons cache (run twice: the first run may dequantize).

    .venv/bin/python benchmarks/load_time.py

Prints the first load in this process (which also pays transformers' lazy module imports) and a second load in
the same process (the cache read itself). The issue's target: a second load < 2 s.
"""

import time

import kneurons

t = time.time()
kneurons.load_model()
first = time.time() - t
t = time.time()
kneurons.load_model()
second = time.time() - t
print(f"first load in this process: {first:.2f} s (includes transformers' lazy imports); "
      f"second load: {second:.2f} s (target < 2 s: {'met' if second < 2 else 'NOT met'})")
