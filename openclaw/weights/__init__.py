"""Where weights come from and how they are read: checkpoint files and formats (safetensors, AWQ, bitsandbytes,
NF4, GGUF), their sizes, the model manifest and downloads, and the loader that fills a model definition."""
