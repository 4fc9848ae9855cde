"""`python -m alignkit ...` (also how `accelerate launch -m alignkit train ...` starts it)."""

from alignkit.cli import main

if __name__ == "__main__":
    main()
