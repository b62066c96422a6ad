"""The trainer's old address: it moved to `c2c.tools.train_fuser` in 0.3.0. `python -m
c2c.train_fuser ...` (and `accelerate launch -m c2c.train_fuser`) keep working and say where it went;
`c2c-train-fuser` is unchanged."""

import sys

from .tools.train_fuser import main

if __name__ == "__main__":
    print("note: python -m c2c.train_fuser is now python -m c2c.tools.train_fuser (or the c2c-train-fuser command)",
          file=sys.stderr)
    sys.exit(main())
