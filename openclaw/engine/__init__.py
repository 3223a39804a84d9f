"""The engine: sequences, the scheduler, the runner (batch -> tensors -> forward, CUDA graphs), the sampler, the
KV pool and the VRAM plan. Token ids in, token ids out; the engine never prints."""
