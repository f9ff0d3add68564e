"""The three long-running workers: ingest, router and sink."""
