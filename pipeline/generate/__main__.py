"""``python -m pipeline.generate``."""

from pipeline.generate.stage import main

if __name__ == "__main__":
    main()
