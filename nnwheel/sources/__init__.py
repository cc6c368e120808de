"""Model sources: one module per input format, each reading a file safely and describing what it holds."""
