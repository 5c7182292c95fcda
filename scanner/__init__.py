"""scanner: tell AI-synthesized images from real photographs, fast.

Importing this package is cheap: heavy and GPU-only modules are imported where they are used.
"""

__version__ = "0.1.0"
