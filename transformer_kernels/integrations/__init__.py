"""Integrations with other libraries; each imports its library only when it is itself imported (all optional)."""
