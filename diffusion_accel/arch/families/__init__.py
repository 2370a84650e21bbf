"""Built-in adapters, one module per denoiser family; importing this package registers them."""

from . import dit, flux, pixart, sd3, unet2d, unet2d_condition  # noqa: F401

