"""Ray Serve application for exported one-step generators: `serve run serve/config.yaml` (see docs/serving.md)."""
