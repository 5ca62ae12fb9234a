"""Training, export and quantization of the appliance's UNet++ models (needs the `train` extra)."""
