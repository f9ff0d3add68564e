"""Operator tools: replay, record, redrive, status, schema export, demo."""
