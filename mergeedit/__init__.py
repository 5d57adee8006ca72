"""mergeedit: knowledge editing by robust fine-tuning plus model merging, and a streaming merge engine."""

__version__ = "0.1.0"
