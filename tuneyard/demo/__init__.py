"""The demo: a tiny local model, a sample dataset, and the end-to-end flow through the HTTP API."""
