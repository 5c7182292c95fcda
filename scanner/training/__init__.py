"""Training and evaluation of the detector on labelled folders (CNNDetection layout).

data reads the folders and augments images; train runs the recipe end to end; evaluate and metrics
give AP per source and family and the robustness sweeps; leave_one_out holds each generator out in
turn. token_cache, token_training and cached_loo train and evaluate on cached outputs of a frozen
trunk, in seconds per epoch; calibration fits Platt scaling on out-of-fold logits.
"""
