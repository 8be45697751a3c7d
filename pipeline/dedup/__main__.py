"""``python -m pipeline.dedup``."""

from pipeline.dedup.stage import main

if __name__ == "__main__":
    main()
