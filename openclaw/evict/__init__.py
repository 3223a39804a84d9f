"""KV eviction: the policies (score and select), the compression loop that applies them to the pool, and the
TriAttention query statistics (calibration files and online statistics)."""
