#!/usr/bin/env python
"""Build stage-1 weak pairs; the same as `tsarank data weak-pairs` (see --help)."""

import sys

from tsarank.commands.data import main

if __name__ == "__main__":
    sys.exit(main())
