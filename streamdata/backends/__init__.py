"""Storage backends behind :class:`streamdata.TokenStore` (internal; use :func:`streamdata.open_store`)."""
