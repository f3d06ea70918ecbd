"""``python -m ptlight.eval``: see :mod:`ptlight.eval.app`."""

from ptlight.eval.app import main

if __name__ == "__main__":
    main()
