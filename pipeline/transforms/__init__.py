"""MONAI Compose pipelines built from plans and typed settings."""
