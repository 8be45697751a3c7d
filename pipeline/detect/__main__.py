"""``python -m pipeline.detect``."""

from pipeline.detect.stage import main

if __name__ == "__main__":
    main()
