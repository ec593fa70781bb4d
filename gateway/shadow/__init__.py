"""Shadow comparison: a mirrored answer compared with the primary's, off the request path."""
