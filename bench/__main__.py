"""``python -m bench``: the whole benchmark suite (GPU), or its CPU smoke mode without a GPU."""

from bench.run import main

if __name__ == "__main__":
    raise SystemExit(main())
