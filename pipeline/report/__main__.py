"""``python -m pipeline.report``."""

from pipeline.report.stage import main

if __name__ == "__main__":
    main()
