"""The OpenAI-compatible HTTP server: connections and threads, the wire format, and tool-call parsing."""
