"""``python -m pipeline.prescreen``."""

from pipeline.prescreen.stage import main

if __name__ == "__main__":
    main()
