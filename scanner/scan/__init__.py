"""`scanner run`: the scan of one machine, and its output.

Sources are enumerated on a thread, each item is read, hashed and decoded on a pool of decode
workers (prepare), batches go through a backend's runner on the scan's thread (inference), and a
writer thread appends the records (results) to the output (store: lock, resume, crash-safe appends;
parquet for `--format parquet`; idset for the ids already done). final_view is the one rule for
which of an id's records counts (its last; an id whose last record is a transient error is scanned
again), for resume, the summary, reports, the Parquet rewrite and merges alike. preflight stops a
run that needs an optional package which is not installed, before the model loads. pipeline joins
the stages with bounded queues; progress shows how far it is.
"""
