"""`python -m fastsr ...`: the same command line as the `fastsr` console script."""
from fastsr.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
