"""`python -m entrypoint` is the `lora-entrypoint` command."""

from entrypoint.cli import main

if __name__ == "__main__":
    main()
