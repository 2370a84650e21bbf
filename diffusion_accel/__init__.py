"""diffusion_accel: make diffusers pipelines faster and smaller without retraining."""

__version__ = "0.1.0"
