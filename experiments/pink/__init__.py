"""Pink-style referring tasks on the toy VLM (``python -m experiments pink``)."""
