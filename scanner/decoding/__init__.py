"""Bytes to pixels: the CPU decoder and the batch loaders.

decode is the one decoder every path falls back to (torchvision.io for plain JPEG/WebP, Pillow for
everything else, EXIF orientation, a pixel budget). loaders chooses how a scan decodes: on its
decode workers (cpu), or a batch at a time right before inference on the GPU (dali, nvjpeg), each
with the CPU decoder taking the files it refuses.
"""
