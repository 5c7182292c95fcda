"""The detector, and nothing about how it is run.

A global view of the image and a feature map from a trunk (backbones, clip_vit), the Patch Selection
Module picking where to look (psm, patches), those patches cut from the full-resolution image
(crop_resize, preprocess), the same trunk on them, the attention fusion of patch and global tokens
(fusion) and one logit (detector). weights reads and writes detectors as safetensors and knows the
shipped models. Every module here is the pure-PyTorch reference that the serving backends and the
CUDA kernels are checked against; none imports the scan, its stage timer or a backend.
"""
