"""Scale-out: the scan as a Ray Data pipeline over a cluster (`scanner run --ray`), and its output.

ray_scan runs the same per-item work as a local scan (prepare, the backend's runner) in Ray actors;
parts writes their records as whole JSONL parts with a manifest, and merges them (`scanner merge`).
"""
