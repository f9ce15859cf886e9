"""Recipe for the small English demo FastSLM shipped as the default model."""
