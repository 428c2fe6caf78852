"""Network factories: segmenters (and, later, classifiers) built by name from typed settings."""
