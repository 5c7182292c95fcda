"""`python -m scanner`: the `scanner` command."""

from scanner.cli import main

if __name__ == "__main__":
    main(prog_name="scanner")
