"""LXMERT toy relational VQA (``python -m experiments lxmert``)."""
