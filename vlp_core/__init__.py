"""vlp_core: all the logic of the platform, importable without Prefect or DVC."""
