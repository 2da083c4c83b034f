#!/usr/bin/env python
"""Thin entry point: see meanflow/jobs/submit.py."""

import sys

from meanflow.jobs.submit import main

if __name__ == "__main__":
    sys.exit(main())
