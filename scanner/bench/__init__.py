"""`scanner bench`: the production scan against the naive baseline, on the same images.

harness runs both and reports images/s, per-stage time (scanner.stages), latency and memory;
naive is the baseline (the detector run the way the paper's public code runs it); inputs samples a
folder or generates JPEGs of chosen sizes.
"""
