"""Configuration: the settings read from the environment, the profiles and the GPUs found."""
