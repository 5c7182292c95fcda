"""scanner: tell AI-synthesized images from real photographs, fast.

The package is laid out by responsibility (docs/design.md, "Where things live"):

    model        the detector (trunks, patch selection, crop-resize, fusion) and its weights
    sources      work items: directories, archives, lists, URLs; reads and their retries
    decoding     bytes to pixels: the CPU decoder and the batch loaders (DALI, nvJPEG)
    scan         `scanner run`: the preflight, the pipeline, inference, the records, the output store,
                 the final view and resume
    backends     serving: torch (CPU, CUDA), onnxruntime, tensorrt; the ONNX export and the engines
    kernels      the CUDA kernels for patch selection and crop-resize (the repository's kernels/)
    training     training, evaluation, leave-one-out, cached trunk outputs, calibration
    reports      `scanner report` and `scanner explain`
    bench        `scanner bench`: the production scan against a naive baseline
    distributed  `scanner run --ray` and its output directory
    cli          the `scanner` command (also `python -m scanner`)

The model imports none of the others, and no module imports itself through others (tests/test_layout.py).
Importing this package is cheap: heavy and GPU-only modules are imported where they are used.
"""

__version__ = "0.1.0"
