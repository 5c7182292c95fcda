"""The `scanner` command line from a checkout: `python cli.py ...` or `python -m cli ...`.

The code is scanner/cli.py (installed, it is the `scanner` command and `python -m scanner`).
"""

from scanner.cli import main

if __name__ == "__main__":
    main()
